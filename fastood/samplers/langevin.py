"""FIG's Langevin dynamic sampler (Zhao, Cao, Lin, TNNLS; Algorithm 1) on the fused ops."""
import math

import torch

from fastood import ops
from fastood.trainers.base import model_device

from ._model_state import frozen

EARLY_STOP = ("chain", "batch", None)
NOISE = ("paper", "authors")


class LangevinSampler:
    """Samples the classifier's implicit generator by sign-gradient Langevin dynamics on the modified energy.

    ``x_0 ~ U(lo, hi)``, ``x_t = clip(x_{t-1} - (eps_t / 2) sign(grad_x E(x_{t-1})) + z_t, lo, hi)`` with
    ``E = sum_y (f_y/c)(1 - exp(f_y/c))`` (FIG eq. for the modified energy), ``z_t ~ N(0, eps_t I)``
    (``noise="paper"``) or ``N(0, eps_t^2 I)`` (``"authors"``, their code), ``eps <- decay * eps`` every
    ``decay_every`` steps.

    Each step: one forward of the still-running chains, ``ops.modified_energy_grad`` on the logits, one backward
    from the logits to the input only (parameters frozen, model in eval mode; both restored afterwards), and
    ``ops.langevin_step_``. The confidence (max softmax) comes from that same forward.

    Args:
        c, step_size, decay, decay_every: the paper's c = 5, eps0 = 0.1, gamma = 0.9, L = 100.
        max_steps: the most updates per chain (the paper converges in T in [10, 100]).
        confidence: early-stopping threshold on max softmax.
        early_stop: ``"chain"`` (each chain freezes once its confidence >= threshold; the working batch is
            compacted as chains finish), ``"batch"`` (the authors' rule: stop all chains once the mean
            confidence > threshold) or None (always ``max_steps`` updates).
        noise: ``"paper"`` or ``"authors"``.
        bounds: ``(lo, hi)``, each a scalar or a per-channel sequence.
        replay_size: > 0 keeps the last ``replay_size`` samples and starts ``replay_fraction`` of each new
            batch from them (persistent chains, fewer steps once warm).
        channels_last, autocast_bf16: CUDA only: channels-last memory format and bfloat16 autocast of the forward.
    ``sample(model, n, shape)`` -> [n, *shape]; ``stats`` describes the last call: ``steps`` [n] (updates per
    chain), ``confidence`` [n] and ``energy`` [n] at each chain's last forward, ``forwards`` (images forwarded).
    """

    def __init__(self, c=5.0, step_size=0.1, decay=0.9, decay_every=100, max_steps=20, confidence=0.9,
                 early_stop="chain", noise="paper", bounds=(-1.0, 1.0), replay_size=0, replay_fraction=0.5,
                 compact_below=0.5, channels_last=False, autocast_bf16=False):
        if early_stop not in EARLY_STOP:
            raise ValueError(f"early_stop must be one of {EARLY_STOP}, got {early_stop!r}")
        if noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
        for name, value in (("c", c), ("step_size", step_size), ("decay", decay)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if int(max_steps) < 1 or int(decay_every) < 1:
            raise ValueError(f"max_steps and decay_every must be >= 1, got {max_steps} and {decay_every}")
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
        self.c, self.step_size, self.decay, self.decay_every = float(c), float(step_size), float(decay), int(decay_every)
        self.max_steps, self.confidence, self.early_stop, self.noise = int(max_steps), float(confidence), early_stop, noise
        self.lower, self.upper = bounds
        self.replay_size, self.replay_fraction = int(replay_size), float(replay_fraction)
        self.compact_below = float(compact_below)
        self.channels_last, self.autocast_bf16 = bool(channels_last), bool(autocast_bf16)
        self.buffer = None
        self.stats = {}

    # ------------------------------------------------------------------ initialization
    def _bound(self, value, shape, device):
        b = torch.as_tensor(value, dtype=torch.float32, device=device)
        return b.reshape((1, -1) + (1,) * (len(shape) - 1)) if b.numel() > 1 else b

    def _init(self, n, shape, device, init):
        lo, hi = self._bound(self.lower, shape, device), self._bound(self.upper, shape, device)
        if init is not None:
            if tuple(init.shape) != (n,) + tuple(shape):
                raise ValueError(f"init must have shape {(n,) + tuple(shape)}, got {tuple(init.shape)}")
            return init.detach().to(device, torch.float32).clone(), 0
        x = lo + (hi - lo) * torch.rand((n,) + tuple(shape), device=device)
        reused = 0
        if self.replay_size > 0 and self.buffer is not None and len(self.buffer) > 0:
            reused = min(int(round(self.replay_fraction * n)), len(self.buffer))
            pick = torch.randint(len(self.buffer), (reused,))
            x[:reused] = self.buffer[pick].to(device)
        return x, reused

    def _remember(self, x):
        if self.replay_size <= 0:
            return
        x = x.detach().cpu()
        self.buffer = x[-self.replay_size:] if self.buffer is None else torch.cat([self.buffer, x])[-self.replay_size:]

    # ------------------------------------------------------------------ sampling
    def _forward(self, model, x, cuda):
        if cuda and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and self.autocast_bf16):
            return model(x)

    def sample(self, model, n, shape, context=None, init=None):
        """``n`` samples of image shape ``shape`` from ``model``'s implicit generator -> [n, *shape] (detached)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        device = model_device(model)
        shape = tuple(shape)
        x, reused = self._init(int(n), shape, device, init)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        conf = torch.zeros(n, device=device)
        energy = torch.zeros(n, device=device)
        forwards = 0
        if n == 0:
            self.stats = {"steps": steps, "confidence": conf, "energy": energy, "forwards": 0, "reused": 0}
            return x
        cuda = device.type == "cuda"
        if cuda and self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        eps = self.step_size
        work_idx = torch.arange(n, device=device)   # chains in the working batch
        xw = x                                      # their current states (x itself until compaction)
        running = torch.ones(n, dtype=torch.bool, device=device)  # per working-batch row
        with frozen(model):
            for t in range(self.max_steps):
                if t > 0 and t % self.decay_every == 0:
                    eps *= self.decay
                x_in = xw.detach().requires_grad_(True)  # shares xw's storage
                logits = self._forward(model, x_in, cuda)
                e, d_energy = ops.modified_energy_grad(logits.detach().float(), self.c)
                (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=d_energy.to(logits.dtype))
                del x_in
                forwards += int(xw.shape[0])
                c_now = torch.softmax(logits.detach().float(), dim=1).amax(dim=1)
                conf[work_idx] = torch.where(running, c_now, conf[work_idx])
                energy[work_idx] = torch.where(running, e.float(), energy[work_idx])
                if self.early_stop == "chain":
                    running = running & (c_now < self.confidence)
                elif self.early_stop == "batch" and conf.mean() > self.confidence:
                    break
                if not running.any():
                    break
                noise_std = math.sqrt(eps) if self.noise == "paper" else eps
                ops.langevin_step_(xw, grad, eps, noise_std, self.lower, self.upper,
                                   active=None if bool(running.all()) else running)
                steps[work_idx] += running.long()
                if self.early_stop == "chain" and running.float().mean() < self.compact_below:
                    x[work_idx] = xw                         # write back, then keep only the running chains
                    work_idx, xw, running = work_idx[running], xw[running], running[running]
            if xw is not x:
                x[work_idx] = xw
        x = x.detach()
        self._remember(x)
        self.stats = {"steps": steps, "confidence": conf, "energy": energy, "forwards": forwards, "reused": reused}
        return x
