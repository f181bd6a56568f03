"""FIG fine-tuning (Zhao, Cao, Lin, TNNLS; Algorithm 2) and its Gaussian-noise baseline GS."""
import math

import torch
import torch.nn.functional as F

from fastood import ops

from .base import Trainer, unwrap


def fig_loss(logits_id, labels, logits_gen, lam=1.0):
    """Algorithm 2's objective ``CE(f(x_id), y) - lam * mean_i H(softmax(f(x_gen_i)))``.

    Args:
        logits_id: [b, C] logits of the ID batch; labels: [b] class indices.
        logits_gen: [g, C] logits of the generated batch (g may be 0: the entropy term is then 0).
        lam: weight of the entropy term (paper: 1).
    Returns ``(loss, ce, mean_entropy)``, scalars; ``loss`` is differentiable in both logits.
    """
    ce = F.cross_entropy(logits_id, labels)
    entropy = ops.softmax_entropy(logits_gen).mean() if logits_gen.shape[0] else logits_id.new_zeros(())
    return ce - lam * entropy, ce, entropy


PENALTIES = ("entropy", "log_entropy")
SATURATED_GRAD = 1e-4  # entropy-gradient norm per generated sample below which the penalty counts as saturated
# (measured, docs/fidelity.md: FIG moved nothing in 200 steps with its samples at 2e-5 and 1e-8, and worked from 3.5e-4)


def entropy_gradient_norm(logits):
    """Per-row norm of the gradient of the softmax entropy with respect to the logits, ``||dH/dz||``.

    ``dH/dz_j = -p_j (log p_j + H)`` (``p = softmax(z)``, ``H = -sum_j p_j log p_j``), computed exactly in float64
    from ``log_softmax`` on the detached logits. Args: ``logits`` [g, C]. Returns [g] (float64; empty for g = 0).
    A saturated row (max softmax 1 - d, d -> 0) has a norm of about ``d log(1/d)``: the entropy term of
    :func:`fig_loss` then has nothing to push with, whatever its weight or the learning rate.
    """
    z = logits.detach().double()
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    entropy = -(p * logp).sum(dim=1, keepdim=True)
    return (p * (logp + entropy)).norm(dim=1)


def saturation_message(logs, threshold=SATURATED_GRAD):
    """A message when the entropy penalty was saturated over ``logs`` (history entries of one epoch or of a
    shorter fit): every step's mean entropy-gradient norm of the generated batch (``gen_entropy_grad``, see
    :func:`entropy_gradient_norm`) below ``threshold``; else None."""
    grads = [h["gen_entropy_grad"] for h in logs if "gen_entropy_grad" in h]
    if not grads or max(grads) >= threshold:
        return None
    conf = [h["gen_confidence"] for h in logs if "gen_confidence" in h]
    conf = f"; mean max softmax of the generated samples {sum(conf) / len(conf):.10f}" if conf else ""
    return (f"the entropy penalty is saturated: over {len(grads)} steps the gradient of the generated samples' entropy "
            f"with respect to their logits stayed below {threshold:g} per sample (largest step mean {max(grads):.2e}"
            f"{conf}). The model is so confident on them that the penalty hardly moves it and fine-tuning reduces to "
            "cross-entropy on the ID batch (measured on full MNIST: the noise sets' AUROC did not move). Use "
            "penalty='log_entropy' (-lam mean log H: the same maximizer, a gradient of order 1 at saturation); "
            "see docs/fidelity.md (FIG, saturation).")


def log_entropy(logits):
    """``log H(softmax(z))`` per row, [g] float64, finite and with an O(1) gradient also where the softmax saturates.

    ``H = sum_j p_j (-log p_j)``, so ``log H = logsumexp_j (log p_j + log(-log p_j))``, computed from ``log_softmax``
    in float64. A class whose ``-log p_j`` rounds to 0 (the top class beyond a logit margin of ~37) is left out: its
    true term, ``p_j (-log p_j) ~ sum of the other p's``, is below theirs by a factor ``log(1/p)``. Its gradient is
    ``grad H / H``: where H is ~1e-8 (issue 19's SmallCNN on full MNIST) the entropy's own gradient is ~1e-8 and
    this one is still of order 1. Args: ``logits`` [g, C]. Returns [g].
    """
    logp = torch.log_softmax(logits.double(), dim=1)
    neg = -logp
    keep = neg > 0
    safe = torch.where(keep, neg, torch.ones_like(neg))  # no log(0) in the graph: its gradient would be NaN
    return torch.logsumexp(torch.where(keep, logp + safe.log(), torch.full_like(neg, -math.inf)), dim=1)


def fig_log_entropy_loss(logits_id, labels, logits_gen, lam=1.0):
    """``CE(f(x_id), y) - lam * mean_i log H(softmax(f(x_gen_i)))``: :func:`fig_loss` with the entropy of each
    generated sample replaced by its logarithm (the same maximizer, the uniform softmax; the gradient scaled by 1/H,
    see :func:`log_entropy`). Not the paper's objective: fastood's option for classifiers whose samples saturate
    the entropy (``FIGTrainer(penalty="log_entropy")``; docs/fidelity.md, FIG, saturation). Same arguments and
    return value as :func:`fig_loss` (the third output is the mean entropy, not its logarithm)."""
    ce = F.cross_entropy(logits_id, labels)
    if not logits_gen.shape[0]:
        zero = logits_id.new_zeros(())
        return ce, ce, zero
    entropy = ops.softmax_entropy(logits_gen.detach()).mean()
    return ce - lam * log_entropy(logits_gen).mean().to(ce.dtype), ce, entropy


class FIGTrainer(Trainer):
    """Fine-tunes a pretrained classifier on the outliers its own implicit generator yields (FIG, Algorithm 2).

    Each step takes an ID batch ``(x, y)`` of b images, draws ``ceil(k * b)`` samples of x's image shape from the
    *current* model with ``sampler`` (default: :class:`~fastood.samplers.langevin.LangevinSampler` with the
    paper's settings and ``bounds``), and minimizes ``CE(f(x), y) - lam * mean H(softmax(f(x_gen)))``
    (:func:`fig_loss`) with SGD (lr 1e-3, momentum 0.9, weight decay 5e-4). Raising the entropy of the model's
    most confident "noise" makes low max-softmax a better OOD score; the detector is MSP (higher = more OOD).

    Budget: give it several epochs. The entropy term first costs ID accuracy, which cross-entropy then wins back.
    Measured on the demo's pretrained SmallCNN (``bench/quality_fig.py``, mnist5k-0to4, seeds 0-2, mean MSP AUROC
    over the five OOD sets, pretrained 60.7; ID accuracy on 500 test images, 1 point = 5 images): with batches of 128
    (the authors' ``--batch-size``) after 62 steps +11.2 AUROC at ID accuracy -1.1 (worst seed -1.2), after 248
    +21.3 / -0.3 (worst -0.4), after the authors' 1000 iterations (``main_FIG.py`` ``train_finetune``; the
    bench's default run) +23.8 / 0.0 (worst -0.2); with batches of 64 after 62 steps (2 epochs) +9.1 / -1.1
    (worst -1.6), after 248 (8 epochs) +21.1 / 0.0 (worst 0.0). The authors' script writes lr 1e-4 into
    ``FIG()``; with it the same 1000 iterations gave +15.8 / 0.0 (after 62 steps nothing: -0.4), so fastood keeps
    the paper's 1e-3 (see docs/fidelity.md).

    Args:
        model: a pretrained classifier (logits [B, C]).
        sampler: any sampler of the protocol ``sample(model, n, shape, context=None)``; default: Langevin.
        k: generated samples per ID sample (paper K = 0.1), >= 0. ``k=0`` draws nothing and is plain cross-entropy
            fine-tuning of the pretrained model (the K = 0 point of the paper's Fig. 1), e.g. as a control run.
            fastood draws ``ceil(k b)``; the authors' ``main_FIG.py`` draws ``max(int(b K), 1)`` (6 instead of 7 at
            b = 64). Measured (``bench/quality_fig.py --seeds 3 --authors-count --epochs 2 --batch-size 64``: 62
            steps): the authors' count gave mean MSP AUROC +9.5 (3/3 seeds) at ID accuracy -1.1 (worst -1.4), the
            default +9.1 (3/3) at -1.1 (worst -1.6): within the seed noise, so the default stays.
        lam: weight of the entropy penalty (paper lambda = 1), >= 0.
        joint_forward: True sends the ID and generated images through the model in one concatenated forward.
            BatchNorm layers (in train mode) then normalize both with the statistics of the mixed batch and update
            their running statistics from it. False runs two forwards: the ID batch is normalized with ID-only
            statistics (as at pretraining), the generated batch with its own, and the running statistics are
            updated twice (once with each batch). Models without BatchNorm give the same loss either way.
            With ``freeze_bn`` (the default) BatchNorm normalizes with the pretrained running statistics in both
            cases and this only changes how the forward is batched.
        freeze_bn: keep BatchNorm in eval mode while fine-tuning (default True; the affine weights still train).
            The paper does not say; fastood's default, because the generated batch otherwise drags the running
            statistics away from the ID data. Measured on mnist5k-0to4 (SmallCNN, 128 steps at lr 1e-3, seed 0): with
            ``freeze_bn=False`` ID accuracy fell to 25% at step 32 (58-70% with ``joint_forward=False``) and the
            mean MSP AUROC ended below the pretrained model's (56 -> 55 / 38); with ``freeze_bn=True`` it rose
            56 -> 81 with accuracy 98.6 -> 97.6, and the generated samples' confidence fell 0.996 -> 0.34.
        bounds: the default sampler's image box (default (-1, 1)); give either a sampler or bounds, not both.
        penalty: ``"entropy"`` (default, the paper's ``-lam * mean H``: :func:`fig_loss`) or ``"log_entropy"``
            (``-lam * mean log H``: :func:`fig_log_entropy_loss`, fastood's option, not the paper's). Use the latter
            when the mechanism check reports a saturated penalty: measured on a SmallCNN pretrained 5 epochs on full
            MNIST (``bench/quality_fig.py --data mnist``, 200 steps of 128; pretrained mean MSP AUROC 47.6, uniform
            noise 12.6, sphere 0.0), the default left it at 48.2 (40.8 after 1000 steps), ``"log_entropy"`` took
            Gaussian, uniform and sphere noise to 100.0 and the mean to 99.0-99.5 in 3/3 seeds, at ID accuracy
            -0.8 (docs/fidelity.md, FIG, saturation).
        **kwargs: the :class:`~fastood.trainers.base.Trainer` options (lr, momentum, weight_decay, checkpoint_dir,
            progress, seed, device, ...).

    ``history`` logs, per step: ``loss``, ``ce``, ``gen_entropy`` and ``gen_confidence`` (mean max softmax of the
    generated batch in the training forward), ``gen_energy`` (its mean modified energy), ``gen_entropy_grad`` (mean
    norm of the gradient of its entropy w.r.t. the logits, :func:`entropy_gradient_norm`), and from a sampler that
    reports them ``sampler_confidence``, ``sampler_energy`` (eval mode, at the sampler's output),
    ``sampler_start_confidence`` (at the chains' starting images: before sampling), ``gen_steps`` (mean Langevin
    updates per chain) and ``gen_steps_min`` (fewest updates of any chain): the curves of the paper's Fig. 3.
    The progress bar shows ``loss``, ``ce``, ``gen_steps`` and ``sampler_confidence``.

    Mechanism check (:meth:`mechanism_idle`): when the sampler reports updates and every chain of a whole epoch (or
    of a shorter fit) took 0 of them, the generated batch is the sampler's starting noise and FIG reduces to an
    entropy penalty on uniform noise; the trainer then warns once (:class:`~fastood.trainers.MechanismIdleWarning`).
    It also warns when the entropy penalty is saturated: every step's generated batch had a mean entropy-gradient
    norm (``gen_entropy_grad``, :func:`entropy_gradient_norm`, logged per step) below ``SATURATED_GRAD`` = 1e-4.
    The model is then so confident on its samples (max softmax within ~1e-5 of 1) that the penalty hardly moves it,
    and FIG is cross-entropy fine-tuning. Measured (issue 19, docs/fidelity.md): SmallCNNs trained 5 epochs on
    full MNIST put their Langevin samples at max softmax 1 - 1e-6 (entropy gradient 2e-5; fastood's
    ``pretrained_small_cnn("mnist", epochs=5)``) or 1 - 5e-10 (1e-8; the issue's network), and FIG left their noise
    AUROC where it was; on the demo's mnist5k model, where FIG works, the samples' gradient is 3.5e-4 at the start.
    The remedy measured there: ``penalty="log_entropy"``.
    """

    default_lr = 1e-3
    progress_keys = ("loss", "ce", "gen_steps", "sampler_confidence")

    def __init__(self, model, sampler=None, k=0.1, lam=1.0, joint_forward=True, bounds=None, freeze_bn=True,
                 penalty="entropy", **kwargs):
        super().__init__(model, freeze_bn=freeze_bn, **kwargs)
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        self.penalty = penalty
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
        from fastood.samplers.langevin import LangevinSampler

        return LangevinSampler(bounds=bounds)

    def training_step(self, batch):
        x, y = batch[0], batch[1]
        if x.shape[0] == 0:
            raise ValueError("FIGTrainer got an empty ID batch")
        n_gen = math.ceil(self.k * x.shape[0])
        if n_gen == 0:  # k = 0: plain cross-entropy fine-tuning, no sampling
            ce = F.cross_entropy(self.net(x).float(), y)
            return {"loss": ce, "ce": ce}
        generated = self.sampler.sample(unwrap(self.model), n_gen, tuple(x.shape[1:]), context=(x, y))
        generated = generated.to(device=x.device, dtype=x.dtype)
        if self.joint_forward:
            logits = self.net(torch.cat([x, generated]))
            logits_id, logits_gen = logits[: x.shape[0]], logits[x.shape[0]:]
        else:
            logits_id, logits_gen = self.net(x), self.net(generated)
        loss_fn = fig_loss if self.penalty == "entropy" else fig_log_entropy_loss
        loss, ce, entropy = loss_fn(logits_id.float(), y, logits_gen.float(), self.lam)
        gen = logits_gen.detach().float()
        logs = {"loss": loss, "ce": ce, "gen_entropy": entropy.detach(),
                "gen_confidence": torch.softmax(gen, 1).amax(1).mean(),
                "gen_entropy_grad": entropy_gradient_norm(gen).mean(),
                "gen_energy": ops.modified_energy(gen, getattr(self.sampler, "c", 5.0)).mean()}
        stats = getattr(self.sampler, "stats", None) or {}
        if "confidence" in stats and len(stats["confidence"]):
            logs["sampler_confidence"] = stats["confidence"].float().mean()
            logs["sampler_energy"] = stats["energy"].float().mean()
            logs["gen_steps"] = stats["steps"].float().mean()
            logs["gen_steps_min"] = stats["steps"].min().float()
        if "start_confidence" in stats and len(stats["start_confidence"]):
            logs["sampler_start_confidence"] = stats["start_confidence"].float().mean()
        return logs

    def mechanism_idle(self, logs):
        """A message when the sampler performed no update over ``logs`` or the entropy penalty was saturated
        (see the class docstring), else None."""
        steps = [h["gen_steps"] for h in logs if "gen_steps" in h]
        if not steps or max(steps) > 0:
            return saturation_message(logs)
        start = [h["sampler_start_confidence"] for h in logs if "sampler_start_confidence" in h]
        conf = f" (mean confidence of the starting images {sum(start) / len(start):.4f})" if start else ""
        return (f"the sampler performed 0 Langevin updates per chain over {len(steps)} steps{conf}: the generated "
                "samples are its starting noise, so FIG only penalizes the entropy of uniform noise. Let every chain "
                "take at least one update before the stop test (LangevinSampler(min_steps=1), the default), or use "
                "early_stop=None / a higher confidence threshold.")

    def detector(self):
        """Maximum softmax probability of the fine-tuned model (the paper's detector; higher score = more OOD)."""
        from fastood.detectors import MSP

        return MSP(unwrap(self.model))


class GaussianNoiseTrainer(FIGTrainer):
    """GS, FIG's baseline: the same loop and loss with clamped Gaussian noise
    (:class:`~fastood.samplers.noise.GaussianNoiseSampler`, std 0.5, fastood's choice: see its docstring) in place
    of the Langevin samples. Takes the :class:`FIGTrainer` arguments. Detector: MSP.

    Its mechanism is the entropy penalty on the noise batch; the logs ``gen_confidence`` / ``gen_entropy`` show it
    (the progress bar too). It does not warn about updates (noise samples take none by design), only when the
    penalty is saturated (as :class:`FIGTrainer`: ``gen_entropy_grad`` below 1e-4 at every step of an epoch).
    """

    progress_keys = ("loss", "ce", "gen_entropy", "gen_confidence")

    def mechanism_idle(self, logs):
        return saturation_message(logs)

    def default_sampler(self, bounds):
        from fastood.samplers.noise import GaussianNoiseSampler

        return GaussianNoiseSampler(bounds=bounds)
