"""FIG fine-tuning (Zhao, Cao, Lin, TNNLS; Algorithm 2) and its Gaussian-noise baseline GS."""
import math

import torch
import torch.nn.functional as F

from fastood import ops

from .base import Trainer, unwrap


def fig_loss(logits_id, labels, logits_gen, lam=1.0):
    """``CE(f(x_id), y) - lam * mean_i H(softmax(f(x_gen_i)))`` (Algorithm 2). Returns (loss, ce, entropy)."""
    ce = F.cross_entropy(logits_id, labels)
    entropy = ops.softmax_entropy(logits_gen).mean() if logits_gen.shape[0] else logits_id.new_zeros(())
    return ce - lam * entropy, ce, entropy


class FIGTrainer(Trainer):
    """Fine-tunes a pretrained classifier on its own generated outliers.

    Each step draws ``ceil(k * b)`` samples from the current model with ``sampler`` (default: a
    :class:`~fastood.samplers.LangevinSampler` with the paper's settings) and minimizes
    ``CE(ID) - lam * mean entropy(generated)`` with SGD (lr 1e-3, momentum 0.9, wd 5e-4).

    ``joint_forward=True`` sends the ID and generated images through the model in one concatenated forward:
    BatchNorm layers then normalize with (and update their running statistics from) the mixed batch.
    ``False`` runs two forwards, so BatchNorm's batch statistics of the ID batch are those of ID images alone
    (its running statistics still see both). The history logs the generated samples' confidence, energy and
    Langevin steps (the paper's Fig. 3). Detector: MSP.
    """

    default_lr = 1e-3

    def __init__(self, model, sampler=None, k=0.1, lam=1.0, joint_forward=True, **kwargs):
        super().__init__(model, **kwargs)
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k}")
        if sampler is None:
            from fastood.samplers import LangevinSampler

            sampler = LangevinSampler()
        if not hasattr(sampler, "sample"):
            raise TypeError(f"sampler must have a sample(model, n, shape) method, got {type(sampler).__name__}")
        self.sampler, self.k, self.lam, self.joint_forward = sampler, float(k), float(lam), bool(joint_forward)

    def training_step(self, batch):
        x, y = batch[0], batch[1]
        n_gen = math.ceil(self.k * x.shape[0])
        generated = self.sampler.sample(unwrap(self.model), n_gen, x.shape[1:], context=(x, y)).to(x.dtype)
        if self.joint_forward:
            logits = self.net(torch.cat([x, generated]))
            logits_id, logits_gen = logits[: x.shape[0]], logits[x.shape[0]:]
        else:
            logits_id, logits_gen = self.net(x), self.net(generated)
        loss, ce, entropy = fig_loss(logits_id, y, logits_gen.float(), self.lam)
        logs = {"loss": loss, "ce": ce, "gen_entropy": entropy,
                "gen_confidence": torch.softmax(logits_gen.detach().float(), 1).amax(1).mean()}
        stats = getattr(self.sampler, "stats", {})
        if "energy" in stats:
            logs["gen_energy"] = stats["energy"].float().mean()
            logs["gen_steps"] = stats["steps"].float().mean()
        return logs

    def extra_state(self):
        return {"replay_buffer": getattr(self.sampler, "buffer", None)}

    def load_extra_state(self, state):
        if state.get("replay_buffer") is not None and hasattr(self.sampler, "buffer"):
            self.sampler.buffer = state["replay_buffer"]


class GaussianNoiseTrainer(FIGTrainer):
    """GS baseline of FIG: the same loop with Gaussian-noise images in place of the Langevin samples."""

    def __init__(self, model, sampler=None, **kwargs):
        if sampler is None:
            from fastood.samplers import GaussianNoiseSampler

            sampler = GaussianNoiseSampler()
        super().__init__(model, sampler=sampler, **kwargs)
