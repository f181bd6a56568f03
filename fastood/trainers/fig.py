"""FIG fine-tuning (Zhao, Cao, Lin, TNNLS; Algorithm 2) and its Gaussian-noise baseline GS: loops over
:class:`fastood.objectives.FIGObjective` / :class:`~fastood.objectives.GaussianNoiseObjective`."""
from fastood.losses import fig_loss  # noqa: F401 (re-exported: fastood.trainers.fig.fig_loss)
from fastood.objectives.fig import FIGObjective, GaussianNoiseObjective

from .base import Trainer, delegated, unwrap


class FIGTrainer(Trainer):
    """Fine-tunes a pretrained classifier on the outliers its own implicit generator yields (FIG, Algorithm 2).

    Each step takes an ID batch ``(x, y)`` of b images, draws ``ceil(k * b)`` samples of x's image shape from the
    *current* model with ``sampler`` (default: :class:`~fastood.samplers.langevin.LangevinSampler` with the
    paper's settings and ``bounds``), and minimizes ``CE(f(x), y) - lam * mean H(softmax(f(x_gen)))``
    (:func:`fastood.losses.fig_loss`) with SGD (lr 1e-3, momentum 0.9, weight decay 5e-4). The step is
    :class:`~fastood.objectives.FIGObjective` (``trainer.objective``), which your own loop can call as well. Raising the entropy of the model's
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
        freeze_bn: keep BatchNorm in eval mode while fine-tuning (default ``True``; the affine weights still train).
            The paper does not say; fastood's default, because the generated batch otherwise drags the running
            statistics away from the ID data. Measured on mnist5k-0to4 (SmallCNN, 128 steps at lr 1e-3, seed 0): with
            ``freeze_bn=False`` ID accuracy fell to 25% at step 32 (58-70% with ``joint_forward=False``) and the
            mean MSP AUROC ended below the pretrained model's (56 -> 55 / 38); with ``freeze_bn=True`` it rose
            56 -> 81 with accuracy 98.6 -> 97.6, and the generated samples' confidence fell 0.996 -> 0.34.
        bounds: the default sampler's image box (default (-1, 1)); give either a sampler or bounds, not both.
        **kwargs: the :class:`~fastood.trainers.base.Trainer` options (lr, momentum, weight_decay, checkpoint_dir,
            progress, seed, device, ...).

    ``history`` logs, per step: ``loss``, ``ce``, ``gen_entropy`` and ``gen_confidence`` (mean max softmax of the
    generated batch in the training forward), ``gen_energy`` (its mean modified energy), and from a sampler that
    reports them ``sampler_confidence``, ``sampler_energy`` (eval mode, at the sampler's output),
    ``sampler_start_confidence`` (at the chains' starting images: before sampling), ``gen_steps`` (mean Langevin
    updates per chain) and ``gen_steps_min`` (fewest updates of any chain): the curves of the paper's Fig. 3.
    The progress bar shows ``loss``, ``ce``, ``gen_steps`` and ``sampler_confidence``.

    Mechanism check (:meth:`mechanism_idle`): when the sampler reports updates and every chain of a whole epoch (or
    of a shorter fit) took 0 of them, the generated batch is the sampler's starting noise and FIG reduces to an
    entropy penalty on uniform noise; the trainer then warns once (:class:`~fastood.trainers.MechanismIdleWarning`).
    """

    default_lr = 1e-3
    progress_keys = ("loss", "ce", "gen_steps", "sampler_confidence")

    objective_class = FIGObjective
    sampler = delegated("sampler")
    k = delegated("k")
    lam = delegated("lam")
    joint_forward = delegated("joint_forward")

    def __init__(self, model, sampler=None, k=0.1, lam=1.0, joint_forward=True, bounds=None, freeze_bn=True,
                 **kwargs):
        objective = self.objective_class(sampler, k=k, lam=lam, joint_forward=joint_forward, bounds=bounds,
                                         check_range=False)  # fit checks the first batch
        super().__init__(model, freeze_bn=freeze_bn, **kwargs)
        objective.owner = type(self).__name__
        self.objective = objective

    def default_sampler(self, bounds):
        """The sampler built when none is given (the objective's: Langevin for FIG, Gaussian noise for GS)."""
        return self.objective.default_sampler(bounds)

    def training_step(self, batch):
        loss, logs = self.objective(self.net, batch[0], batch[1])
        return {**logs, "loss": loss}

    def mechanism_idle(self, logs):
        """A message when the sampler performed no update over ``logs`` (see the class docstring), else None."""
        steps = [h["gen_steps"] for h in logs if "gen_steps" in h]
        if not steps or max(steps) > 0:
            return None
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
    (the progress bar too). It never warns as idle: noise samples take no updates by design.
    """

    progress_keys = ("loss", "ce", "gen_entropy", "gen_confidence")
    objective_class = GaussianNoiseObjective

    def mechanism_idle(self, logs):
        return None
