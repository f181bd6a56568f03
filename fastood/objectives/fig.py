"""FIG's fine-tuning step (Zhao, Cao, Lin, TNNLS; Algorithm 2) and its Gaussian-noise baseline GS, as objectives."""
import math

import torch
import torch.nn.functional as F

from fastood import ops
from fastood.losses import fig_loss

from .base import Objective, check_id_batch, check_weight, unwrap


class FIGObjective(Objective):
    """FIG's loss of one ID batch: ``loss, logs = FIGObjective(sampler, k=0.1, lam=1.0)(model, x, y)``.

    Draws ``ceil(k * b)`` images of ``x``'s shape from the *current* ``model`` with ``sampler`` (Algorithm 2's
    implicit generator; default :class:`~fastood.samplers.langevin.LangevinSampler` with the paper's settings and
    ``bounds``) and returns ``CE(f(x), y) - lam * mean H(softmax(f(x_gen)))`` (:func:`fastood.losses.fig_loss`):
    raising the entropy of the model's most confident "noise" makes low max-softmax a better OOD score.
    :class:`~fastood.trainers.FIGTrainer` is a loop over this objective.

    Args:
        sampler: any sampler of the protocol ``sample(model, n, shape, context=None)``; default: Langevin in
            ``bounds``.
        k: generated samples per ID sample (paper K = 0.1), >= 0; ``k=0`` draws nothing (plain cross-entropy).
        lam: weight of the entropy term (paper lambda = 1), >= 0.
        joint_forward: True (default): ID and generated images go through the model in one concatenated forward;
            False: two forwards. With BatchNorm frozen (see below) this only changes how the forward is batched.
        bounds: the default sampler's image box (default (-1, 1)); give either a sampler or bounds, not both.
        check_range: check the first ID batch against the sampler's box (:func:`fastood.check_data_range`).

    Call: ``model`` a classifier (logits [B, C]; a DDP wrapper is fine), ``x`` ID images [b, ...] (b >= 1), ``y``
    labels [b]. Returns ``(loss, logs)``: ``loss`` a differentiable scalar, ``logs`` detached scalars ``loss``,
    ``ce``, ``gen_entropy``, ``gen_confidence`` (mean max softmax of the generated batch), ``gen_energy`` (its mean
    modified energy) and, from a sampler that reports them, ``sampler_confidence``, ``sampler_energy``,
    ``sampler_start_confidence``, ``gen_steps`` and ``gen_steps_min`` (Langevin updates per chain).

    BatchNorm: FIG fine-tunes with BatchNorm frozen (FIGTrainer's ``freeze_bn=True``): in your loop call it as
    ``with fastood.frozen_batchnorm(model): loss, logs = fig(model, x, y)``, else the generated batch drags the
    running statistics away from the ID data. The sampler runs the model in eval mode and restores its modes.
    """

    def __init__(self, sampler=None, k: float = 0.1, lam: float = 1.0, joint_forward: bool = True, bounds=None,
                 check_range: bool = True):
        super().__init__(check_range=check_range)
        if isinstance(k, bool) or not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k!r}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if sampler is not None and bounds is not None:
            raise ValueError("give either a sampler or bounds (for the default sampler), not both: "
                             "pass bounds to the sampler you construct")
        if sampler is None:
            sampler = self.default_sampler((-1.0, 1.0) if bounds is None else bounds)
        if not callable(getattr(sampler, "sample", None)):
            raise TypeError(f"sampler must have a sample(model, n, shape, context=None) method, got "
                            f"{type(sampler).__name__}")
        self.sampler, self.k, self.lam, self.joint_forward = sampler, float(k), float(lam), bool(joint_forward)

    def default_sampler(self, bounds):
        """The sampler used when none is given: :class:`~fastood.samplers.langevin.LangevinSampler` in ``bounds``."""
        from fastood.samplers.langevin import LangevinSampler

        return LangevinSampler(bounds=bounds)

    def num_generated(self, batch_size: int) -> int:
        """Images generated for an ID batch of ``batch_size``: ``ceil(k * batch_size)``."""
        return math.ceil(self.k * batch_size)

    def __call__(self, model, x, y):
        check_id_batch(self.owner, x, y)
        self._check_range_once(x)
        n_gen = self.num_generated(x.shape[0])
        if n_gen == 0:  # k = 0: plain cross-entropy fine-tuning, no sampling
            ce = F.cross_entropy(model(x).float(), y)
            return ce, {"loss": ce.detach(), "ce": ce.detach()}
        generated = self.sampler.sample(unwrap(model), n_gen, tuple(x.shape[1:]), context=(x, y))
        generated = generated.to(device=x.device, dtype=x.dtype)
        if self.joint_forward:
            logits = model(torch.cat([x, generated]))
            logits_id, logits_gen = logits[: x.shape[0]], logits[x.shape[0]:]
        else:
            logits_id, logits_gen = model(x), model(generated)
        loss, ce, entropy = fig_loss(logits_id.float(), y, logits_gen.float(), self.lam)
        gen = logits_gen.detach().float()
        logs = {"loss": loss.detach(), "ce": ce.detach(), "gen_entropy": entropy.detach(),
                "gen_confidence": torch.softmax(gen, 1).amax(1).mean(),
                "gen_energy": ops.modified_energy(gen, getattr(self.sampler, "c", 5.0)).mean()}
        logs.update(self.sampler_logs())
        return loss, logs

    def sampler_logs(self) -> dict:
        """What the sampler reported about its last call (``sampler.stats``), as scalars."""
        logs = {}
        stats = getattr(self.sampler, "stats", None) or {}
        if "confidence" in stats and len(stats["confidence"]):
            logs["sampler_confidence"] = stats["confidence"].float().mean()
            logs["sampler_energy"] = stats["energy"].float().mean()
            logs["gen_steps"] = stats["steps"].float().mean()
            logs["gen_steps_min"] = stats["steps"].min().float()
        if "start_confidence" in stats and len(stats["start_confidence"]):
            logs["sampler_start_confidence"] = stats["start_confidence"].float().mean()
        return logs


class GaussianNoiseObjective(FIGObjective):
    """GS, FIG's baseline: FIG's loss with clamped Gaussian noise
    (:class:`~fastood.samplers.noise.GaussianNoiseSampler`, std 0.5) in place of the Langevin samples. Takes the
    :class:`FIGObjective` arguments; :class:`~fastood.trainers.GaussianNoiseTrainer` is a loop over it."""

    def default_sampler(self, bounds):
        """:class:`~fastood.samplers.noise.GaussianNoiseSampler` in ``bounds``."""
        from fastood.samplers.noise import GaussianNoiseSampler

        return GaussianNoiseSampler(bounds=bounds)


__all__ = ["FIGObjective", "GaussianNoiseObjective"]
