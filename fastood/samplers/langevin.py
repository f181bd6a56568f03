"""FIG's Langevin dynamic sampler (Zhao, Cao, Lin, TNNLS; Algorithm 1) on the fused ops.

The classifier ``f`` defines an implicit generator through its modified energy
``E(x) = sum_y (f_y(x)/c) (1 - exp(f_y(x)/c))``; the sampler descends it with sign-gradient Langevin dynamics
inside the image box and returns the images the classifier is most confident about although they are noise.
"""
import math
import warnings
import weakref

import torch
from torch import nn

from fastood import ops
from fastood._hyperparameters import RecordsHyperparameters
from fastood.batches import model_device

from ._locks import one_call_per_model
from . import precision as _precision
from ._model_state import frozen
from .noise import check_bounds, check_count, check_shape, uniform_in

EARLY_STOP = ("chain", "batch", None)
NOISE = ("paper", "authors", None)
_REFORWARD_BELOW = 0.5  # re-forward the running rows alone when fewer than this fraction of a forward's rows run
_WARMUP_ITERS = 3  # eager iterations on a side stream before a CUDA graph is captured (as PyTorch's docs do)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


class _FoldedView:
    """The model as the sampler runs it (eval mode), with BatchNorm folded into the convolutions before it.

    Every ``Conv2d`` whose only consumer is a ``BatchNorm2d`` with running statistics becomes one convolution
    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta`` (g, beta: the BN affine
    parameters, m, v: its running mean and variance) -- the same function in eval mode, with one layer less to
    run forward and backward. The graph comes from ``torch.fx.symbolic_trace`` once per model; every other module
    in it is the model's own (shared, not copied). :meth:`refresh` copies the current weights and statistics into
    the folded convolutions in place (their storage never moves, so a captured CUDA graph stays valid).
    """

    def __init__(self, model, channels_last):
        import torch.fx

        self.model_ref = weakref.ref(model)
        self.structure = self.structure_of(model)
        gm = torch.fx.symbolic_trace(model)  # raises for models fx cannot trace: the caller falls back
        modules = dict(gm.named_modules())
        self.pairs = []
        for node in list(gm.graph.nodes):
            bn = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or len(node.args) != 1 or node.kwargs:
                continue
            src = node.args[0]
            conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
            if not isinstance(conv, nn.Conv2d) or len(src.users) != 1 or conv.out_channels != bn.num_features:
                continue
            # skip_init: no random initialization, so building a view never moves torch's RNG stream
            folded = torch.nn.utils.skip_init(
                nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype).requires_grad_(False)
            if channels_last:
                folded.to(memory_format=torch.channels_last)
            name = f"fastood_folded_{len(self.pairs)}"
            gm.add_submodule(name, folded)
            with gm.graph.inserting_after(src):
                fused_node = gm.graph.call_module(name, src.args, src.kwargs)
            node.replace_all_uses_with(fused_node)
            gm.graph.erase_node(node)
            gm.graph.erase_node(src)
            self.pairs.append((conv, bn, folded))
        gm.graph.lint()
        gm.recompile()
        self.module = gm.eval()
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self.all_convs_folded = bool(convs) and len(convs) == len(self.pairs)

    @staticmethod
    def structure_of(model):
        return tuple(id(m) for m in model.modules())

    def matches(self, model):
        """The view still runs ``model``: same object, same modules, and every folded convolution still on its
        source convolution's device and dtype (``model.to(...)`` / ``.double()`` keep module ids but move the
        weights, so the view must be rebuilt then)."""
        if self.model_ref() is not model or self.structure != self.structure_of(model):
            return False
        return all(folded.weight.device == conv.weight.device and folded.weight.dtype == conv.weight.dtype
                   for conv, _, folded in self.pairs)

    @torch.no_grad()
    def refresh(self):
        for conv, bn, folded in self.pairs:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            folded.bias.copy_(shift)


class LangevinSampler(metaclass=RecordsHyperparameters):
    """Samples a classifier's implicit generator by sign-gradient Langevin dynamics on the modified energy.

    Algorithm 1 of FIG: ``x_0 ~ U(lo, hi)`` and, for t = 1..T,
    ``x_t = clip(x_{t-1} - (eps_t / 2) sign(grad_x E(x_{t-1})) + z_t, lo, hi)``, with
    ``z_t ~ N(0, eps_t^2 I)`` (``noise="authors"``, the default: std eps, as the authors' ``SamplerSGLD`` in
    Lawliet-zzl/FIG ``code_FIG/model_func.py``, the code behind the paper's tables) or ``N(0, eps_t I)``
    (``"paper"``: variance eps, as Algorithm 1 is written) or no noise (``None``), and ``eps <- decay * eps``
    every ``decay_every`` steps (:meth:`step_size_at`).

    Why std eps by default: with variance eps the noise (std sqrt(0.1) = 0.32 per pixel) is six times the sign
    step eps/2 = 0.05 and drowns the drift. Measured on the demo's pretrained SmallCNN with its last layer scaled
    by 0.1 (start confidence 0.57), 20 updates, no early stop: ``"paper"`` noise ended at mean confidence 0.85 with
    0% of chains reaching 0.9; ``"authors"`` noise reached 0.9 in 8 updates for 100% of chains
    (``tests/test_langevin_sampler.py::test_paper_noise_drowns_the_drift`` pins the direction). The trade-off in
    FIG fine-tuning of that SmallCNN (``bench/quality_fig.py --seeds 3 --before --epochs 2 --batch-size 64``, 62
    steps): std eps +9.1 mean MSP AUROC at -1.5 points ID accuracy; variance eps (with ``min_steps=0``) +14.9 at -0.3
    (its chains stay at confidence ~0.7). With the authors' budget (the bench's protocol now: 1000 iterations of
    batch 128) std eps gives +23.8 at 0.0 (worst seed -0.2); docs/fidelity.md.

    At least ``min_steps`` (default 1) updates run before any stop test, as in the authors' loop (update, then
    test the batch's mean confidence): a pretrained classifier is often >= 0.999 confident on uniform noise, and
    testing the starting noise first returned it unchanged (0 updates for 100% of chains on the demo's SmallCNN),
    which turns FIG into an entropy penalty on uniform noise.

    Each update costs one forward of the still-running chains, :func:`fastood.ops.modified_energy_grad` on the
    logits, and one backward from the logits to the input only (every parameter's ``requires_grad`` is switched
    off, so no parameter gradient is computed or stored; the model is in eval mode), then
    :func:`fastood.ops.langevin_step_`. The confidence (max softmax) comes from the same forward: no second
    forward. A chain's confidence and energy are those of the state it is returned in (one gradient-free forward
    follows the last update). When fewer than half of a forward's chains still run, those are forwarded again on
    their own and only they go backward (cheaper than a backward through the whole batch).

    Args:
        c, step_size, decay, decay_every: the paper's c = 5, eps0 = 0.1, gamma = 0.9, L = 100.
        max_steps: the most updates per chain (the paper's T in [10, 100]; the authors' default T = 20).
        min_steps: updates every chain takes before the first stop test (default 1, the authors' loop; capped by
            ``max_steps``). 0 tests the starting images first (a confident start is returned unchanged).
        confidence: early-stopping threshold on the max softmax probability (the authors' 0.9).
        early_stop: ``"chain"``: a chain freezes (is never updated again) once its confidence >= ``confidence``;
            frozen chains leave the working batch, which is compacted whenever fewer than ``compact_below`` of its
            rows still run. ``"batch"``: the authors' rule (``SamplerSGLD.forward`` in Lawliet-zzl/FIG
            ``code_FIG/model_func.py``), all chains stop once the mean confidence > ``confidence``. ``None``: always
            ``max_steps`` updates. ``"chain"`` (default) is fastood's: measured in FIG fine-tuning of the demo's
            SmallCNN (``bench/quality_fig.py --seeds 3 --batch-stop --epochs 2 --batch-size 64``: 62 steps),
            ``"batch"`` gave mean MSP AUROC +6.3 (higher in 2/3 seeds) at ID accuracy -1.6 (worst -4.4),
            ``"chain"`` +9.1 (3/3) at -1.1 (worst -1.6); the batch rule lets some chains stop below the target
            while others overshoot it. Under the bench's protocol (the authors' 1000 iterations of batch 128) the
            order reversed: ``"batch"`` +25.4 (3/3) at -0.07, ``"chain"`` +23.8 (3/3) at -0.07, but ``"batch"``
            with the authors' sample count +23.7 -- within the spread of near-identical configurations, so the
            default is unchanged (docs/fidelity.md).
        noise: ``"authors"`` (std eps, default), ``"paper"`` (std sqrt(eps)) or None (noise-free descent).
        bounds: ``(lower, upper)``, each a scalar or a per-channel sequence; samples never leave the box.
        init: ``"uniform"`` (U(lower, upper), the paper) or a tensor [m, *shape] of starting images from which
            each chain's start is drawn at random (clamped into the box). ``sample(init=...)`` overrides it.
        replay_buffer: > 0 keeps the last ``replay_buffer`` samples (persistent chains) and starts a
            ``replay_fraction`` of every later batch from them, so a warm sampler needs fewer steps.
        compact_below: ``early_stop="chain"`` only: the working batch is compacted when fewer than this fraction
            of its rows still run; 1.0 compacts as soon as any chain freezes, 0.0 never (frozen rows are then
            masked, which keeps the batch shape fixed). None (default): 1.0 on CPU, where a forward costs in
            proportion to the batch, and 0.5 on CUDA, where small batches underuse the device and every new batch
            shape may cost an algorithm search.
        fold_batchnorm: run the model with each eval-mode BatchNorm2d folded into the Conv2d before it (the same
            function, one layer less forward and backward; see ``_FoldedView``). Needs a model that
            ``torch.fx.symbolic_trace`` can trace and whose folded graph reproduces its logits (checked once per
            model); otherwise (or with False) the model runs as it is. The folded run calls the model's submodules
            but not its own ``forward``: hooks on the top-level model and on folded layers do not fire, and Python
            side effects of ``forward`` (counters, caches) happen once, at tracing -- use False for such models.
            On CPU, when every convolution is folded, the chains are kept in channels-last memory format (faster
            convolutions and pooling there); samples are always returned contiguous.
        precision: the dtype of the forward and the input backward (:mod:`fastood.samplers.precision`):
            ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``torch.autocast`` of the model's device type, CPU or CUDA), or
            ``"auto"`` (default): bfloat16 where the device computes it natively (CUDA compute capability >= 8.0;
            a CPU whose torch kernels run AVX-512 and that has AVX512-BF16 or AMX, detected at run time), float32
            elsewhere. Validated by the FIG quality A/B (bench/quality_fig.py --data fashion-mnist --precision fp32
            bf16, 3 seeds of the 1000-step protocol: mean AUROC 89.1 +- 0.3 vs 88.9 +- 0.4 in float32, the same ID
            accuracy; docs/fidelity.md), after which ``precision.AUTO_USES_BF16`` was set True (False: "auto" =
            float32 everywhere). The update uses only the sign of the gradient: along FIG runs on the pretrained SmallCNN
            (mnist5k-0to4; bench/sign_agreement.py, every update of 3 x 256 chains) bfloat16 agreed with float32
            on 99.1% of the input coordinates and on 100.0% of those whose |gradient| is above the chain's median
            (float16: 99.9% / 100.0%); a random-weight resnet18_cifar: ~96%. The energy and
            the confidence of the stop rule are always computed in float32 from the logits. One rule on CPU and
            CUDA: this setting decides, a surrounding autocast (e.g. a trainer's AMP) is overridden inside the
            sampler -- it neither turns low precision on nor off. ``stats["precision"]`` says what ran,
            ``stats["bf16_native"]`` whether bfloat16 was native. float16 gradients may underflow to 0 (no move
            for that coordinate); each chain's energy gradient is scaled to a maximum of 1 first (a positive
            per-chain factor: the signs are unchanged).
        autocast_bf16: deprecated alias (DeprecationWarning): True = ``precision="bf16"``, False = ``"fp32"``. It
            used to act on CUDA only; as an alias it now applies on CPU too.
        channels_last, cuda_graph: CUDA only (ignored on CPU). ``channels_last`` converts the
            model's parameters to channels-last memory format in place (values unchanged) and keeps the chains in
            that format; ``cuda_graph`` captures the fixed-shape step (forward, energy gradient, input backward)
            in a CUDA graph replayed every step -- the batch is then never compacted (frozen chains are masked).
            The graph is cached and re-captured when the model's parameters move or the batch shape changes.

    ``sample(model, n, shape)`` -> [n, *shape] (detached, on the model's device, in its dtype). ``stats`` describes
    the last call: ``steps`` [n] (updates per chain), ``start_confidence`` [n] (confidence of the starting images),
    ``confidence`` [n] and ``energy`` [n] of the returned samples (lower energy = more "in-distribution" to the
    model), ``forwards`` (images forwarded in total),
    ``passes`` (forward calls), ``reused`` (chains started from the replay buffer), ``folded`` (BatchNorm
    layers folded into convolutions), ``precision`` ("fp32", "bf16" or "fp16": what ran) and ``bf16_native``.
    """

    def __init__(self, c=5.0, step_size=0.1, decay=0.9, decay_every=100, max_steps=20, confidence=0.9,
                 early_stop="chain", noise="authors", bounds=(-1.0, 1.0), init="uniform", replay_buffer=0,
                 replay_fraction=0.5, compact_below=None, fold_batchnorm=True, channels_last=False, autocast_bf16=None,
                 cuda_graph=False, min_steps=1, precision="auto"):
        precision = _precision.check_precision(precision)
        if autocast_bf16 is not None:
            if not isinstance(autocast_bf16, bool):
                raise TypeError(f"autocast_bf16 must be None or a bool, got {autocast_bf16!r}")
            alias = "bf16" if autocast_bf16 else "fp32"
            if precision != "auto" and precision != alias:
                raise ValueError(f"autocast_bf16={autocast_bf16} (deprecated) contradicts precision={precision!r}; "
                                 "pass precision only")
            warnings.warn(f"LangevinSampler(autocast_bf16={autocast_bf16}) is deprecated: use "
                          f"precision={alias!r} (it now applies on CPU as on CUDA)", DeprecationWarning, stacklevel=3)
            precision = alias
        if early_stop not in EARLY_STOP:
            raise ValueError(f"early_stop must be one of {EARLY_STOP}, got {early_stop!r}")
        if noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
        for name, value in (("c", c), ("step_size", step_size), ("decay", decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, value in (("max_steps", max_steps), ("decay_every", decay_every), ("replay_buffer", replay_buffer),
                            ("min_steps", min_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if max_steps < 0 or decay_every < 1 or replay_buffer < 0 or min_steps < 0:
            raise ValueError(f"need max_steps >= 0, decay_every >= 1, replay_buffer >= 0 and min_steps >= 0, got "
                             f"{max_steps}, {decay_every}, {replay_buffer} and {min_steps}")
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {confidence}")
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
        if compact_below is not None and not 0.0 <= compact_below <= 1.0:
            raise ValueError(f"compact_below must be in [0, 1], got {compact_below}")
        if not (isinstance(init, torch.Tensor) or init == "uniform"):
            raise ValueError(f"init must be 'uniform' or a tensor of starting images, got {init!r}")
        if isinstance(init, torch.Tensor) and (init.dim() < 2 or init.shape[0] == 0):
            raise ValueError(f"an init tensor must be [m, *shape] with m >= 1, got shape {tuple(init.shape)}")
        self.c, self.step_size, self.decay, self.decay_every = float(c), float(step_size), float(decay), decay_every
        self.max_steps, self.confidence, self.early_stop, self.noise = max_steps, float(confidence), early_stop, noise
        self.min_steps = min_steps
        self.lower, self.upper = check_bounds(bounds)
        self.init = init.detach() if isinstance(init, torch.Tensor) else init
        self.replay_buffer, self.replay_fraction = replay_buffer, float(replay_fraction)
        self.compact_below = None if compact_below is None else float(compact_below)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.channels_last, self.precision = bool(channels_last), precision
        self._amp_dtype = None  # the autocast dtype of the running sample() call (None: float32)
        self.cuda_graph = bool(cuda_graph)
        self.buffer = None      # replay buffer [<= replay_buffer, *shape] on the samples' device
        self.stats = {}
        self._graph = None      # cached _CapturedStep (CUDA only)
        self._graph_failed = False
        self._view = None       # cached _FoldedView, or (model ref, structure) of a model that cannot be folded

    @property
    def autocast_bf16(self) -> bool:
        """Deprecated: whether ``precision`` is ``"bf16"``."""
        return self.precision == "bf16"

    # ------------------------------------------------------------------ schedule
    def step_size_at(self, t: int) -> float:
        """eps of update ``t`` (0-based): ``step_size * decay ** (t // decay_every)``."""
        return self.step_size * self.decay ** (t // self.decay_every)

    def noise_std(self, eps: float) -> float:
        """Standard deviation of z_t for step size ``eps``: eps (authors, default), sqrt(eps) (paper) or 0."""
        if self.noise == "paper":
            return math.sqrt(eps)
        return eps if self.noise == "authors" else 0.0

    # ------------------------------------------------------------------ state (replay buffer)
    def state_dict(self) -> dict:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        buffer = state.get("buffer")
        if buffer is not None and not isinstance(buffer, torch.Tensor):
            raise TypeError(f"state['buffer'] must be a tensor or None, got {type(buffer).__name__}")
        self.buffer = buffer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_graph"] = None  # a captured CUDA graph cannot be pickled or copied
        state["_view"] = None   # nor a weak reference; both are rebuilt on the next call
        return state

    # ------------------------------------------------------------------ initialization
    def _start(self, n, shape, device, dtype, init):
        """Starting images [n, *shape] and how many of them come from the replay buffer."""
        size = (n,) + shape
        explicit = init is not None
        init = self.init if init is None else init
        if isinstance(init, torch.Tensor):
            if explicit and tuple(init.shape) != size:
                raise ValueError(f"init must have shape {size}, got {tuple(init.shape)}")
            if not explicit and tuple(init.shape[1:]) != shape:
                raise ValueError(f"the sampler's init tensor holds images of shape {tuple(init.shape[1:])}, "
                                 f"but samples of shape {shape} were requested")
            if not torch.isfinite(init).all():
                raise ValueError("init contains NaN or Inf")
            if explicit:
                x = init.detach().to(device=device, dtype=dtype, copy=True)
            else:
                pick = torch.randint(init.shape[0], (n,), device=init.device)
                x = init.index_select(0, pick).to(device=device, dtype=dtype)
            lo = torch.tensor(self.lower, dtype=dtype, device=device)
            hi = torch.tensor(self.upper, dtype=dtype, device=device)
            if lo.numel() > 1 or hi.numel() > 1:
                view = (1, -1) + (1,) * (len(shape) - 1)
                lo, hi = lo.reshape(view) if lo.numel() > 1 else lo, hi.reshape(view) if hi.numel() > 1 else hi
            x = torch.minimum(torch.maximum(x, lo), hi)
        else:
            x = uniform_in(self.lower, self.upper, size, device, dtype)
        reused = 0
        buffer = self.buffer
        if (not explicit and self.replay_buffer > 0 and buffer is not None and len(buffer) > 0
                and tuple(buffer.shape[1:]) == shape):
            reused = min(int(round(self.replay_fraction * n)), n)
            if reused:
                pick = torch.randint(len(buffer), (reused,), device=buffer.device)
                x[:reused] = buffer.index_select(0, pick).to(device=device, dtype=dtype)
        return x, reused

    def _remember(self, x):
        if self.replay_buffer <= 0 or x.shape[0] == 0:
            return
        x = x.detach()
        if self.buffer is None or self.buffer.shape[1:] != x.shape[1:]:
            self.buffer = x[-self.replay_buffer:].clone()
        else:
            self.buffer = torch.cat([self.buffer.to(x.device, x.dtype), x])[-self.replay_buffer:].clone()

    # ------------------------------------------------------------------ the network the chains run through
    def _network(self, model, x, cuda):
        """``(net, view)``: the folded view of ``model`` (refreshed) when possible, else ``(model, None)``.

        Called in eval mode (inside ``frozen``), so tracing sees the eval-mode forward. A new view is checked once
        against the model itself on the first rows of ``x``; a model that cannot be traced, has nothing to fold or
        disagrees with its folded view is remembered and run as it is.
        """
        if not self.fold_batchnorm:
            return model, None
        view = self._view
        if isinstance(view, _FoldedView) and view.matches(model):
            view.refresh()
            return view.module, view
        if isinstance(view, tuple) and view[0]() is model and view[1] == _FoldedView.structure_of(model):
            return model, None
        self._graph = None
        self._view = (weakref.ref(model), _FoldedView.structure_of(model))   # until proven foldable
        try:
            view = _FoldedView(model, channels_last=not cuda or self.channels_last)
        except Exception:  # noqa: BLE001 - a model fx cannot trace is run as it is
            return model, None
        if not view.pairs:
            return model, None
        view.refresh()
        probe = x[:8]
        # Compared in full precision (bf16 rounding would hide nothing structural but fail a tight test); the
        # tolerance only has to separate rounding (TF32 convolutions included) from a wrong graph.
        with torch.no_grad(), _precision.autocast(probe.device, None):
            expected = model(probe)            # the model's own errors propagate
            try:
                got = view.module(probe)
            except Exception:  # noqa: BLE001 - a traced graph that cannot run: use the model itself
                return model, None
        if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return model, None
        scale = max(1.0, float(expected.detach().float().abs().max()))
        if not torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * scale):
            return model, None
        self._view = view
        return view.module, view

    # ------------------------------------------------------------------ one forward (+ backward)
    def _autocast(self, device):
        # Explicit even for float32: it overrides an enclosing autocast (e.g. a trainer's AMP) on CPU and CUDA alike.
        # A CUDA graph cannot replay autocast's weight cache, hence no cache while capturing.
        return _precision.autocast(device, self._amp_dtype, cache_enabled=not self.cuda_graph)

    def _evaluate(self, model, x, cuda, need_grad):
        """One forward of the chains x [m, ...].

        Returns ``(energy [m], confidence [m], all_finite (0-dim bool), grad_fn)``; ``grad_fn()`` runs the one
        backward from the logits to x and returns dE/dx [m, ...] (None when ``need_grad`` is False).
        """
        with torch.enable_grad() if need_grad else torch.no_grad(), self._autocast(x.device):
            x_in = x.detach().requires_grad_(True) if need_grad else x
            logits = model(x_in)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits [{x.shape[0]}, num_classes] for a batch of {x.shape[0]} "
                             f"images, got {got}")
        lf = logits.detach().float()
        confidence = torch.softmax(lf, dim=1).amax(dim=1)
        finite = torch.isfinite(lf).all()
        if not need_grad:
            return ops.modified_energy(lf, self.c), confidence, finite, None
        energy, d_energy = ops.modified_energy_grad(lf, self.c)
        if logits.dtype == torch.float16:  # a positive factor per chain: the signs stay, fewer gradients underflow
            d_energy = d_energy / d_energy.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)

        def grad_fn():
            (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=d_energy.to(logits.dtype))
            return grad

        return energy, confidence, finite, grad_fn

    # ------------------------------------------------------------------ sampling
    @one_call_per_model  # thread-safe: one call at a time per model and per sampler (see _locks)
    def sample(self, model, n, shape, context=None, init=None):
        """``n`` samples of image shape ``shape`` (C, H, W) from ``model``'s implicit generator.

        Args:
            model: the classifier (logits [B, num_classes]); its mode and ``requires_grad`` flags are restored
                afterwards, also when an exception is raised; it gets no parameter gradients.
            n: number of chains / samples.
            shape: image shape (C, ...).
            context: ignored (sampler protocol).
            init: optional starting images [n, *shape] (clamped into the box; no replay for this call).
        Returns: [n, *shape] detached samples in the box, on the model's device, in the model's dtype.
        Raises: FloatingPointError if the model produced NaN/Inf logits.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        n = check_count(n)
        shape = check_shape(shape, (self.lower, self.upper))
        if torch.is_inference_mode_enabled():
            raise RuntimeError("LangevinSampler.sample needs input gradients: do not call it under "
                               "torch.inference_mode()")
        device, dtype = model_device(model), _model_dtype(model)
        cuda = device.type == "cuda"
        self._amp_dtype, precision = _precision.resolve(self.precision, device)
        x, reused = self._start(n, shape, device, dtype, init)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        conf = torch.zeros(n, dtype=torch.float32, device=device)
        start_conf = torch.zeros(n, dtype=torch.float32, device=device)
        energy = torch.zeros(n, dtype=torch.float32, device=device)
        counts = {"forwards": 0, "passes": 0}
        folded = 0
        if n > 0:
            with frozen(model):
                if cuda and self.channels_last:
                    model.to(memory_format=torch.channels_last)
                net, view = self._network(model, x, cuda)
                folded = 0 if view is None else len(view.pairs)
                channels_last = x.dim() == 4 and (self.channels_last if cuda else
                                                  view is not None and view.all_convs_folded)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                captured = self._captured_step(net, x) if cuda and self.cuda_graph else None
                if captured is not None:
                    finite = self._run_graphed(captured, x, steps, conf, energy, counts, start_conf)
                else:
                    finite = self._run(net, x, steps, conf, energy, counts, cuda, start_conf)
            if not bool(finite):
                self.stats = {}
                raise FloatingPointError("LangevinSampler: the model produced non-finite logits (NaN/Inf) while "
                                         "sampling; check its weights and inputs")
        x = x.detach().contiguous()
        self._remember(x)
        self.stats = {"steps": steps, "start_confidence": start_conf, "confidence": conf, "energy": energy,
                      "forwards": counts["forwards"],
                      "passes": counts["passes"], "reused": reused, "folded": folded,
                      "precision": precision["precision"], "bf16_native": precision["bf16_native"]}
        return x

    def _stop_rule(self, c_now, running, t):
        """Update the running mask [m] after the forward before update ``t`` (0-based). Returns (running or None for
        all, any_running). No test before ``min_steps`` updates (the authors update first, then test)."""
        if t < self.min_steps:
            return running, True
        if self.early_stop == "chain":
            still = c_now < self.confidence
            running = still if running is None else running & still
            return running, bool(running.any())
        if self.early_stop == "batch" and float(c_now.mean()) > self.confidence:
            return running, False
        return running, True

    @staticmethod
    def _record(idx, running, c_now, e_now, conf, energy):
        """Write the chains' latest confidence/energy; rows frozen before this forward keep theirs."""
        if running is None:
            conf[idx] = c_now
            energy[idx] = e_now.float()
        else:
            conf[idx] = torch.where(running, c_now, conf[idx])
            energy[idx] = torch.where(running, e_now.float(), energy[idx])

    @staticmethod
    def _compact(x, xw, idx, running):
        """Keep only the running rows in the working batch; frozen rows are written back to x first."""
        if xw is not x:
            done = ~running
            x[idx[done]] = xw[done]
        keep = running.nonzero().squeeze(1)
        xw = xw.index_select(0, keep)
        if xw.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            xw = xw.contiguous(memory_format=torch.channels_last)
        return xw, idx[keep]

    def _run(self, model, x, steps, conf, energy, counts, cuda, start_conf):
        """Eager loop over the working batch ``xw`` (chains ``idx`` of x), compacted as chains freeze.

        After a forward in which fewer than half of the working rows still run, those rows are forwarded again on
        their own and only they go backward: cheaper than a backward through the whole batch (a backward costs
        about as much as a forward). This is what makes a mostly-converged batch (e.g. a pretrained model that is
        confident on most uniform-noise starts) nearly free.
        """
        idx = torch.arange(x.shape[0], device=x.device)
        xw, running = x, None   # xw shares x's storage until the first compaction; running None = all rows
        compact_below = self.compact_below if self.compact_below is not None else (0.5 if cuda else 1.0)
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        for t in range(self.max_steps + 1):
            last = t == self.max_steps
            e_now, c_now, ok, grad_fn = self._evaluate(model, xw, cuda, need_grad=not last)
            finite &= ok
            if t == 0:
                start_conf.copy_(c_now)
            self._record(idx, running, c_now, e_now, conf, energy)
            counts["forwards"] += xw.shape[0]
            counts["passes"] += 1
            if last:
                break
            running, go_on = self._stop_rule(c_now, running, t)
            if not go_on:
                break
            if running is not None and compact_below > 0:
                n_running = int(running.sum())
                if n_running == xw.shape[0]:
                    running = None
                elif n_running < min(_REFORWARD_BELOW, compact_below) * xw.shape[0]:
                    del grad_fn
                    xw, idx = self._compact(x, xw, idx, running)
                    running = None
                    _, _, ok, grad_fn = self._evaluate(model, xw, cuda, need_grad=True)
                    finite &= ok
                    counts["forwards"] += xw.shape[0]
                    counts["passes"] += 1
            eps = self.step_size_at(t)
            ops.langevin_step_(xw, grad_fn(), eps, self.noise_std(eps), self.lower, self.upper, active=running)
            del grad_fn
            if running is None:
                steps[idx] += 1
                continue
            steps[idx] += running.long()
            n_running = int(running.sum())
            if n_running == xw.shape[0]:
                running = None
            elif n_running < compact_below * xw.shape[0]:
                xw, idx = self._compact(x, xw, idx, running)
                running = None
        if xw is not x:
            x[idx] = xw
        return finite

    # ------------------------------------------------------------------ CUDA graph
    def _run_graphed(self, captured, x, steps, conf, energy, counts, start_conf):
        """The same loop on a fixed batch: the step is a replayed CUDA graph, frozen chains are masked."""
        xs = captured.x
        xs.copy_(x)
        idx = torch.arange(x.shape[0], device=x.device)
        running = None
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        for t in range(self.max_steps + 1):
            e_now, c_now, ok, grad = captured.run()
            finite &= ok
            if t == 0:
                start_conf.copy_(c_now)
            self._record(idx, running, c_now, e_now, conf, energy)
            counts["forwards"] += xs.shape[0]
            counts["passes"] += 1
            if t == self.max_steps:
                break
            running, go_on = self._stop_rule(c_now, running, t)
            if not go_on:
                break
            eps = self.step_size_at(t)
            ops.langevin_step_(xs, grad, eps, self.noise_std(eps), self.lower, self.upper, active=running)
            steps += 1 if running is None else running.long()
        x.copy_(xs)
        return finite.clone()

    def _captured_step(self, model, x):
        """The cached CUDA graph of the step for this model and batch (captured on first use), or None when the
        step cannot be captured (a warning is issued once; the eager loop runs instead)."""
        if self._graph_failed:
            return None
        key = (id(model), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, self.c, self._amp_dtype,
               tuple(t.data_ptr() for t in model.parameters()), tuple(t.data_ptr() for t in model.buffers()))
        if self._graph is None or self._graph.key != key:
            self._graph = None  # free the old graph's memory pool before capturing a new one
            try:
                self._graph = _CapturedStep(key, x, lambda xs: self._graph_body(model, xs))
            except RuntimeError as exc:
                self._graph_failed = True
                warnings.warn(f"LangevinSampler: CUDA graph capture failed ({exc}); sampling without a graph",
                              RuntimeWarning, stacklevel=3)
                return None
        return self._graph

    def _graph_body(self, model, xs):
        energy, confidence, finite, grad_fn = self._evaluate(model, xs, True, need_grad=True)
        return energy, confidence, finite, grad_fn()


class _CapturedStep:
    """``body(x)`` captured in a CUDA graph on a static input ``x`` (a private copy). ``run()`` replays it and returns
    the same static outputs, overwritten in place."""

    def __init__(self, key, x_example, body):
        self.key = key
        self.x = x_example.detach().clone()
        side = torch.cuda.Stream(device=self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):   # lets cuDNN/cuBLAS pick algorithms and allocate workspaces
                body(self.x)
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = body(self.x)

    def run(self):
        self.graph.replay()
        return self.outputs
