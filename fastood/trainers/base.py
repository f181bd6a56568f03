"""The training loop every fastood method shares: optimization, progress, checkpoints, resume, DDP.

A method subclasses :class:`Trainer` and implements :meth:`Trainer.training_step`; everything else
(epochs or a step budget, checkpointing, exact resume, distributed data parallel) lives here.
"""
import contextlib
import itertools
import logging
import math
import numbers
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from fastood._modes import capture_modes, freeze_batchnorm_, restore_modes
from fastood._rng import capture_rng, restore_rng  # noqa: F401 (re-exported)
from fastood._stack import user_stacklevel
from fastood.batches import BatchReader, check_device, first_item, model_device  # noqa: F401 (re-exported)
from fastood.data_range import DataRangeWarning, range_problems
from fastood.objectives.base import unwrap  # noqa: F401 (re-exported)
from fastood.trainers.checkpoint import (CheckpointError, NonFiniteStateError, check_writable, describe_non_finite,
                                         first_non_finite, load_checkpoint_file, save_checkpoint_file)
from fastood.trainers.interrupt import StopSignals, TrainingInterrupted
from fastood.trainers.resume import RecordsHyperparameters, Resumed, ResumeWarning, check_compatible, method_name

_END = object()
_RESUME_MODES = ("auto", True, False)
#: the schedules fastood builds for a run's budget: the method's own ("auto") and cosine annealing to 0
NAMED_SCHEDULES = ("auto", "cosine")


def cosine_schedule(optimizer, total_steps: int):
    """Cosine annealing of ``optimizer``'s learning rates to 0 over ``total_steps`` scheduler steps (at least 1):
    ``scheduler="cosine"``, and the methods whose own schedule it is."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps)))
logger = logging.getLogger("fastood.trainers")


class MechanismIdleWarning(RuntimeWarning):
    """A trainer's method-specific mechanism (Langevin updates, an outlier term, ...) stayed off for a whole
    epoch (or a whole fit shorter than one): the run trains, but not the way its paper does."""


class AmpIgnoredWarning(UserWarning):
    """``amp=True`` could not be honoured on this device (a CPU without native bfloat16): training runs float32."""


class ModelReplacedWarning(UserWarning):
    """A trainer trains a new module in place of the model it was given (ICE's Gaussian-head classifier): score and
    save ``trainer.model`` (or use ``trainer.detector()``), not the variable you passed in."""


def delegated(name: str, doc: str = None) -> property:
    """A trainer attribute that reads and writes the attribute ``name`` of its :attr:`Trainer.objective` (the
    trainers are loops over the objectives of :mod:`fastood.objectives`: ``trainer.lam = 0.5`` changes the loss)."""
    return property(lambda self: getattr(self.objective, name),
                    lambda self, value: setattr(self.objective, name, value),
                    doc=doc or f"The objective's ``{name}`` (``trainer.objective.{name}``).")


def check_budget(name: str, value) -> int:
    """``epochs`` / ``steps`` as a positive int; floats (even 2.0), bools, zero and negatives are refused, since
    ``int(0.5)`` silently trains nothing and ``int(2.7)`` silently trains 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast_from_rank0(*values):
    """``values`` as rank 0 has them, on every rank (picklable Python objects; unchanged outside a process
    group). For quantities each rank measures on its own shard that must agree, such as energy margins."""
    if not is_distributed():
        return values
    values = list(values)
    dist.broadcast_object_list(values, src=0)
    return tuple(values)


def _is_scheduler(value) -> bool:
    return isinstance(value, torch.optim.lr_scheduler.LRScheduler)


class Trainer(metaclass=RecordsHyperparameters):
    """Base trainer.

    Args:
        model: the network to train (its parameters are optimized in place).
        lr, momentum, weight_decay: SGD hyperparameters used by :meth:`configure_optimizer` (when fastood builds
            the optimizer; with ``optimizer=`` set them on your optimizer).
        optimizer: your optimizer, used as it is (learning rate, groups, schedule untouched), or a callable
            ``params -> optimizer`` (e.g. ``lambda params: torch.optim.AdamW(params, lr=3e-4)``) that the trainer
            calls with :meth:`trainable_parameters` once its model is final. An optimizer must hold every parameter
            the method trains, including heads a trainer adds or replaces (ICE's Gaussian head, an n+1 head, a
            second head), which an optimizer built on the model before the trainer does not: pass the callable
            form then. :meth:`fit` refuses an optimizer that misses any, naming them.
        scheduler: the LR schedule, stepped after every optimizer step. ``"auto"`` (default): the method's paper
            schedule when fastood builds the optimizer, none with your ``optimizer=`` (fastood never attaches its
            schedule to your optimizer); ``"cosine"``: cosine annealing from ``lr`` to 0 over the run's steps
            (``fit``'s budget; like ``"auto"``, only on fastood's optimizer); ``None``: constant LR; a callable
            ``optimizer -> scheduler`` (e.g. ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)``) or a
            scheduler already built on ``optimizer``.
            Its state is checkpointed with the run. A resumed ``fit`` with a different budget (``steps``/``epochs``)
            than the checkpoint's rebuilds fastood's schedule for the new budget at the current step (as if the run
            had had that budget from the start), and says so; your own scheduler continues as it is.
        batch_fn, batch_keys: how to read images and labels from the loaders' batches when they are not
            ``(images, labels)`` tuples or dicts with usual keys (:class:`fastood.batches.BatchReader`).
        checkpoint_dir: where ``checkpoint.pt`` is written every ``checkpoint_every`` steps (and every
            ``checkpoint_minutes``), on SIGINT/SIGTERM and at the end; it is checked writable before training.
            :meth:`fit` resumes from it (see ``resume`` there): model, optimizer, step, position in the epoch, RNG
            states, method state. Writes are atomic, fsynced and checksummed, and a state holding inf/NaN is never
            written over a good checkpoint (:mod:`fastood.trainers.checkpoint`).
        checkpoint_minutes: also write the checkpoint when this many minutes (wall clock) passed since the last
            write; None (default): by step count only.
        progress: show a tqdm progress bar (rank 0 only).
        seed: seeds the per-epoch data order, so a resumed run sees the same batches.
        device: where to train; default: the model's device.
        grad_clip: optional max gradient norm.
        amp: run the training step's forward passes under bfloat16 autocast: on CUDA always, on CPU where the CPU
            computes bfloat16 natively (AVX512-BF16 or AMX, :func:`fastood.samplers.precision.cpu_bf16_native`);
            on a CPU without it (where emulated bfloat16 is slower than float32) training stays float32 and an
            :class:`AmpIgnoredWarning` says why. ``amp_info`` records what was chosen. A sampler inside the step
            keeps its own ``precision`` (the FIG quality A/B, docs/fidelity.md, measures both).
        freeze_bn: keep every BatchNorm layer in eval mode while training (running statistics fixed and used for
            normalization; the affine weights still train), so outliers or generated images in a batch cannot
            shift the ID features' normalization (:func:`fastood.frozen_batchnorm` does the same in your own loop).
            Default ``False``. Trainers whose default differs say so in their own docstring: FIGTrainer defaults to
            ``True``, ICETrainer to ``None`` (frozen when the Gaussian head was fitted on trained features);
            ManifoldTrainer also takes ``"auto"``; OETrainer, EnergyOETrainer and DiscrepancyTrainer keep ``False``.
        skip_nonfinite: on a non-finite loss, skip the batch (no update; the BatchNorm buffers restored), count it
            in ``skipped_batches`` and the ``skipped_nonfinite`` log, warn, and go on. Default False: raise a
            ``FloatingPointError`` naming the step, the batch and whether the input itself was non-finite. A skipped
            batch counts as a step of the budget (so the schedule and resume stay aligned); method state the
            forward changed outside the model (a sampler's replay buffer) and the random streams are not rolled back.
        handle_signals: while :meth:`fit` runs (in the main thread), SIGINT/SIGTERM finish the current step,
            write the checkpoint and raise :class:`~fastood.trainers.interrupt.TrainingInterrupted` (a
            ``KeyboardInterrupt``); the same signal again aborts at once. Default True.
        sync_bn: under DDP, normalize BatchNorm layers with the statistics of the global batch (all ranks), so a
            run on N ranks equals one process on the same global batches (:mod:`fastood.sync_batchnorm`).
            Default False: each rank normalizes with its own shard's statistics and DDP copies rank 0's running
            statistics to the others — a different computation from one process whenever BatchNorm trains.

    :meth:`fit` leaves the model's train/eval modes (every submodule's, BatchNorm's included) as it found them.

    Under ``torchrun`` (an initialized process group) the model is wrapped in
    DistributedDataParallel, checkpoints are written by rank 0 and logged metrics are all-reduced.
    Loaders should then use a ``DistributedSampler``; its ``set_epoch`` is called every epoch.
    """

    default_lr = 0.1
    #: log keys shown in the progress bar (None: the first four of each step's logs)
    progress_keys = None
    #: the method's step as an object of :mod:`fastood.objectives` (set by the method trainers), which
    #: :meth:`training_step` calls; None for a trainer that computes its loss itself
    objective = None

    def __init__(self, model: nn.Module, *, lr=None, momentum=0.9, weight_decay=5e-4, optimizer=None,
                 scheduler="auto", checkpoint_dir=None, checkpoint_every=100, progress=True, seed=0, device=None,
                 grad_clip=None, amp=False, freeze_bn=False, checkpoint_minutes=None, skip_nonfinite=False,
                 handle_signals=True, sync_bn=False, batch_fn=None, batch_keys=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable params -> optimizer, got "
                            f"{type(optimizer).__name__}")
        if optimizer is not None and lr is not None:
            raise ValueError(f"lr={lr!r} is for the optimizer fastood builds; with optimizer= set the learning rate on "
                             "your optimizer")
        if not (scheduler is None or scheduler in NAMED_SCHEDULES or callable(scheduler) or _is_scheduler(scheduler)):
            raise TypeError(f"scheduler must be 'auto', 'cosine', None, a callable optimizer -> LR scheduler or an "
                            f"LR scheduler, got {scheduler!r}")
        if _is_scheduler(scheduler) and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("a scheduler instance needs the optimizer it schedules as optimizer=; with a callable "
                             "optimizer= pass scheduler=lambda opt: ... instead")
        if _is_scheduler(scheduler) and scheduler.optimizer is not optimizer:
            raise ValueError("scheduler was built on another optimizer than optimizer=: pass the optimizer it "
                             "schedules, or a callable optimizer -> scheduler")
        self.model = model
        self.device = check_device(device) if device is not None else model_device(model)
        self.model.to(self.device)
        self.lr = self.default_lr if lr is None else float(lr)
        # Beyond the parameters' largest value the SGD update overflows with torch's cryptic "value cannot be
        # converted to type float without overflow" at the first step.
        largest = min((torch.finfo(p.dtype).max for p in model.parameters() if p.is_floating_point()),
                      default=math.inf)
        if not (math.isfinite(self.lr) and 0 < self.lr <= largest):
            raise ValueError(f"lr must be a finite number > 0 (at most {largest:.3g} for these parameters' dtype), "
                             f"got {lr}")
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.checkpoint_dir = checkpoint_dir
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every = int(checkpoint_every)
        if checkpoint_minutes is not None:
            if isinstance(checkpoint_minutes, bool) or not isinstance(checkpoint_minutes, (int, float)) \
                    or not (math.isfinite(checkpoint_minutes) and checkpoint_minutes > 0):
                raise ValueError(f"checkpoint_minutes must be a number > 0 or None, got {checkpoint_minutes!r}")
        self.checkpoint_minutes = checkpoint_minutes
        self.skip_nonfinite = bool(skip_nonfinite)
        self.handle_signals = bool(handle_signals)
        self.sync_bn = bool(sync_bn)
        self.skipped_batches = []  # [{"step", "epoch", "batch", "input_finite"}] of batches skipped (skip_nonfinite)
        self.resumed = None        # a Resumed(path, step, total_steps) once fit() continued from a checkpoint
        self._last_save = time.monotonic()
        self._bn_swaps = None
        self.progress = progress
        self.seed = int(seed)
        self.grad_clip = grad_clip
        self.amp, self.amp_info = self._resolve_amp(amp, self.device)
        self.freeze_bn = bool(freeze_bn)
        self._optimizer = optimizer
        self._user_optimizer = optimizer is not None
        self._scheduler_arg = scheduler
        self._checkpoint_schedule = None  # (total_steps, scheduler state) read from a checkpoint, used by fit
        self._schedule_total = None       # the budget the current scheduler was built for
        self.batch_reader = BatchReader(batch_fn=batch_fn, batch_keys=batch_keys)
        self._range_checked = False
        self.scheduler = None
        self.total_steps = None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history = []
        self._net = None
        self._mechanism_warned = False

    # ----------------------------------------------------------------- to override
    def training_step(self, batch) -> dict:
        """Compute the loss of one batch. Returns a dict with ``"loss"`` (a scalar tensor to minimize)
        and any other scalars to log (tensors or floats)."""
        raise NotImplementedError

    def trainable_parameters(self):
        """Parameters the optimizer updates (default: every parameter of the model that requires grad)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainable_parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def configure_scheduler(self, optimizer, total_steps: int):
        """The method's own LR schedule for a run of ``total_steps`` optimizer steps, stepped after every step, or
        None (default: constant LR). Used only when fastood builds the optimizer and ``scheduler="auto"``."""
        return None

    def mechanism_idle(self, logs: list) -> "str | None":
        """Whether the method's own mechanism was off over ``logs`` (the history entries of one epoch, or of a
        whole fit shorter than an epoch). Return None when it was engaged, else a message saying what stayed
        off, why it matters and what to change; :meth:`fit` warns once per trainer with it
        (:class:`MechanismIdleWarning`). Default: None (plain cross-entropy has no mechanism to check)."""
        return None

    def _check_mechanism(self, logs: list) -> None:
        if self._mechanism_warned or not logs:
            return
        message = self.mechanism_idle(logs)
        if message:
            self._mechanism_warned = True
            warnings.warn(f"{type(self).__name__}: {message}", MechanismIdleWarning,
                          stacklevel=user_stacklevel())

    def on_fit_start(self, loader) -> None:
        """Called once per :meth:`fit` before the first step (after a resume, if any)."""

    def extra_state(self) -> dict:
        """Method state to checkpoint beside the model (margins, replay buffers, ...). Default: the state of the
        trainer's ``sampler`` attribute, when it has one with ``state_dict()`` (a Langevin replay buffer, fitted
        class ellipsoids), so a resumed run draws from the same sampler state."""
        state_dict = getattr(getattr(self, "sampler", None), "state_dict", None)
        return {"sampler": state_dict()} if callable(state_dict) else {}

    def load_extra_state(self, state: dict) -> None:
        load = getattr(getattr(self, "sampler", None), "load_state_dict", None)
        if "sampler" in state and callable(load):
            load(state["sampler"])

    def detector(self):
        """The method's own OOD detector; the base returns maximum softmax probability."""
        from fastood.detectors import MSP

        return MSP(unwrap(self.model))

    # ----------------------------------------------------------------- machinery
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = self.configure_optimizer()
        elif not isinstance(self._optimizer, torch.optim.Optimizer):  # a user's callable params -> optimizer
            built = self._optimizer(self.trainable_parameters())
            if not isinstance(built, torch.optim.Optimizer):
                raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}")
            self._optimizer = built
        return self._optimizer

    @property
    def net(self) -> nn.Module:
        """The model to call in :meth:`training_step`: DDP-wrapped under torchrun, else the model."""
        if self._net is None:
            needs_ddp = is_distributed() and any(p.requires_grad for p in self.model.parameters())
            if needs_ddp:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            else:
                self._net = self.model
        return self._net

    @property
    def _user_scheduler(self) -> bool:
        return self._scheduler_arg is not None and self._scheduler_arg not in NAMED_SCHEDULES

    def _named_schedule(self, total: int):
        """fastood's schedule for a run of ``total`` steps: ``"cosine"``, or the method's own (``"auto"``)."""
        if self._scheduler_arg == "cosine":
            return cosine_schedule(self.optimizer, total)
        return self.configure_scheduler(self.optimizer, total)

    def _setup_schedule(self, total: int) -> None:
        """Build (or keep) the LR scheduler for a run of ``total`` steps, after any resume.

        Your own scheduler is built once and continues (its checkpointed state restored). fastood's schedule depends
        on the budget: kept when the budget is unchanged, else rebuilt for ``total`` and advanced to the current step
        from the optimizer's initial learning rates, so that the LR is what a run with budget ``total`` would have
        at this step (a cosine schedule resumed from 20 to 40 steps continues a 40-step cosine)."""
        saved_total, saved_state = self._checkpoint_schedule or (None, None)
        from_checkpoint = self._checkpoint_schedule is not None
        self._checkpoint_schedule = None
        if self._user_scheduler:
            if self.scheduler is None:
                arg = self._scheduler_arg
                self.scheduler = arg if _is_scheduler(arg) else arg(self.optimizer)
                if not _is_scheduler(self.scheduler) and not callable(getattr(self.scheduler, "step", None)):
                    raise TypeError(f"scheduler(optimizer) must return an LR scheduler (with step()), got "
                                    f"{type(self.scheduler).__name__}")
            if saved_state is not None:
                self.scheduler.load_state_dict(saved_state)
            self._schedule_total = total
            return
        if self._scheduler_arg is None or self._user_optimizer:  # no schedule: never attached to your optimizer
            self._schedule_total = total
            return
        if from_checkpoint and saved_total in (None, total):
            # the budget the checkpoint was written with: its scheduler continues exactly
            self._schedule_total = total
            self.scheduler = self._named_schedule(total)
            if self.scheduler is not None and saved_state is not None:
                self.scheduler.load_state_dict(saved_state)
            return
        if not from_checkpoint and self._schedule_total == total and (self.scheduler is not None or self.step == 0):
            return
        previous = saved_total if from_checkpoint else self._schedule_total
        self._schedule_total = total
        for group in self.optimizer.param_groups:  # the schedule starts again from the base learning rate
            if "initial_lr" in group:
                group["lr"] = group["initial_lr"]
        self.scheduler = self._named_schedule(total)
        if self.scheduler is not None and self.step > 0:
            with warnings.catch_warnings():  # stepping without optimizer.step() is intended here
                warnings.simplefilter("ignore")
                for _ in range(self.step):
                    self.scheduler.step()
            if previous is not None and rank() == 0:
                lrs = ", ".join(f"{g['lr']:.3g}" for g in self.optimizer.param_groups)
                warnings.warn(f"{type(self).__name__}: the budget changed from {previous} to {total} steps; the LR "
                              f"schedule was rebuilt for {total} steps and continues at step {self.step} (lr {lrs})",
                              stacklevel=user_stacklevel())

    def check_optimizer(self) -> None:
        """Every parameter the method trains must be in the optimizer, else it would silently never train (e.g. a
        user optimizer built before a trainer replaced the model's head)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        trained = {id(p) for p in self.trainable_parameters()}
        missing = [name for name, p in unwrap(self.model).named_parameters() if id(p) in trained and id(p) not in held]
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ValueError(f"{type(self).__name__}: the optimizer does not hold {len(missing)} trainable "
                             f"parameter(s) of trainer.model: {shown}. This trainer may have added or replaced "
                             "modules (a new head) after your optimizer was built: pass optimizer=lambda params: "
                             "torch.optim.SGD(params, lr=...) (any optimizer), which the trainer builds over its "
                             "final model")

    def data_box(self):
        """``(lower, upper)`` (tuples of floats, scalar or per channel) where the method generates images, or None.
        Default: the bounds of the trainer's ``sampler``, when it has them."""
        sampler = getattr(self, "sampler", None)
        lower, upper = getattr(sampler, "lower", None), getattr(sampler, "upper", None)
        return None if lower is None or upper is None else (tuple(lower), tuple(upper))

    def check_data_range(self, images: torch.Tensor) -> None:
        """Warn once (:class:`~fastood.data_range.DataRangeWarning`, pointing at your ``fit`` call) when the first
        ID batch does not fit :meth:`data_box`: outside it by more than 10% of its width on a channel (a [-1, 1]
        box for mean/std-normalized data in [-2, 2.1]), or spanning at most half of its width on a channel (pixels in
        [0, 1] under the default [-1, 1] box: half of every generated image lies where the data never go). The
        message names :func:`fastood.data.bounds_for`. See :func:`fastood.check_data_range`."""
        if self._range_checked:
            return
        self._range_checked = True
        box = self.data_box()
        if box is None or not isinstance(images, torch.Tensor) or images.dim() < 2 or images.numel() == 0 \
                or not images.is_floating_point():
            return
        problems = range_problems(images, box, strict=False)  # a channel-count mismatch is the sampler's error
        if problems:
            warnings.warn(f"{type(self).__name__}: " + "; and ".join(problems), DataRangeWarning,
                          stacklevel=user_stacklevel())

    def explain_batch_error(self, images, labels, err: Exception):
        """A clear error for labels a classifier cannot take (negative, or >= its number of outputs), or None."""
        if labels is None or labels.numel() == 0:
            return None
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            return ValueError(f"{type(self).__name__}: labels must be class indices >= 0, got {low} (in batch "
                              f"{self.batch_in_epoch} of epoch {self.epoch}); OOD sets use label -1: train on ID data")
        try:
            from fastood._modes import eval_mode

            with torch.no_grad(), eval_mode(self.model):
                out = unwrap(self.model)(images[:1])
        except Exception:
            return None
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if outputs and outputs[0].dim() == 2 and high >= outputs[0].shape[1]:
            return ValueError(f"{type(self).__name__}: labels range over [{low}, {high}] but the model has "
                              f"{outputs[0].shape[1]} outputs (classes 0..{outputs[0].shape[1] - 1}) (batch "
                              f"{self.batch_in_epoch} of epoch {self.epoch}): check num_classes or the labels ({err})")
        return None

    def to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(b) for b in batch)
        return batch

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "total_steps": self._schedule_total,  # the budget the schedule was built for (a resume may change it)
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "history": list(self.history),
            "rng": capture_rng(),
            "extra": self.extra_state(),
            # What a resume must agree on (fastood.trainers.resume.check_compatible).
            "trainer": {"method": method_name(self), "hyperparameters": dict(getattr(self, "hyperparameters", {})),
                        "total_steps": self.total_steps},
            "skipped_batches": list(self.skipped_batches),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule is (re)built by fit once the budget is known (_setup_schedule); the saved one waits here.
        self._checkpoint_schedule = (state.get("total_steps"), state.get("scheduler"))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = list(state["history"])
        self.skipped_batches = list(state.get("skipped_batches", []))
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and is_distributed() and len(per_rank) == world_size():
            restore_rng(per_rank[rank()])  # each rank continues its own random stream (per-rank sampler seeds)
        else:
            restore_rng(state["rng"])
        self.load_extra_state(state.get("extra", {}))

    @property
    def checkpoint_path(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "checkpoint.pt")

    def _named_state_tensors(self):
        """(name, tensor) of everything a checkpoint stores that training updates: parameters, buffers and the
        optimizer's state (momentum, Adam moments)."""
        model = unwrap(self.model)
        for name, value in model.state_dict().items():
            yield f"model tensor {name!r}", value
        names = {id(p): n for n, p in model.named_parameters()}
        if isinstance(self._optimizer, torch.optim.Optimizer):  # not a user's callable that was never built
            for param, slots in self._optimizer.state.items():
                for slot, value in slots.items():
                    yield f"optimizer state {slot!r} of parameter {names.get(id(param), '?')!r}", value

    def check_finite(self) -> None:
        """Raise :class:`~fastood.trainers.checkpoint.NonFiniteStateError` naming the first parameter, buffer or
        optimizer state tensor holding inf/NaN (under DDP on every rank when any rank's state is non-finite)."""
        found = first_non_finite(self._named_state_tensors())
        bad = found is not None
        if is_distributed():
            flag = torch.tensor([float(bad)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) > 0 and not bad:
                raise NonFiniteStateError(f"{type(self).__name__}: another rank's state holds inf/NaN at step "
                                          f"{self.step}; the checkpoint was not written", "another rank")
        if bad:
            name, value = found
            where = (f"refusing to write it over {self.checkpoint_path} (the last good checkpoint there is kept)"
                     if self.checkpoint_path is not None else "the trained model is not usable")
            raise NonFiniteStateError(
                f"{type(self).__name__}: after step {self.step} the {name} holds {describe_non_finite(value)}; "
                f"{where}. Typical causes: non-finite or huge input values, a learning rate too high for the "
                "model; check the data (see also skip_nonfinite=True)", name)

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0 writes; under DDP every rank must call it, since the ranks' RNG states are
        gathered into it so that a resumed run continues each rank's own random stream).

        The state is checked finite first (:meth:`check_finite`): a model that went to inf/NaN never replaces a
        good checkpoint. The write is atomic, fsynced and checksummed; errors name the file and the cause
        (:func:`fastood.trainers.checkpoint.save_checkpoint_file`)."""
        if self.checkpoint_path is None:
            return
        self.check_finite()
        per_rank = None
        if is_distributed():
            per_rank = [None] * world_size()
            dist.all_gather_object(per_rank, capture_rng())
        error = None
        if rank() == 0:
            state = self.state_dict()
            if per_rank is not None:
                state["rng_per_rank"] = per_rank
            try:
                save_checkpoint_file(state, self.checkpoint_path)
            except Exception as exc:  # told to the other ranks first, so they fail too instead of waiting
                error = exc
        if is_distributed():
            (message,) = broadcast_from_rank0(None if error is None else str(error))
            if message is not None and error is None:
                raise CheckpointError(f"rank 0 failed to write the checkpoint: {message}", self.checkpoint_path)
        if error is not None:
            raise error
        self._last_save = time.monotonic()

    def resume(self) -> bool:
        """Load ``checkpoint_dir/checkpoint.pt`` if it exists. Returns whether it did.

        The checkpoint's checksum is verified, and it must come from the same method (trainer class) with the
        same hyperparameters and model structure, else :class:`~fastood.trainers.resume.ResumeMismatch` names the
        difference. Sets :attr:`resumed` and says "resumed from <path> at step N of M"."""
        path = self.checkpoint_path
        if path is None or not os.path.exists(path):
            return False
        state = load_checkpoint_file(path, map_location=self.device)
        check_compatible(self, state, path, unwrap(self.model).state_dict())
        self.load_state_dict(state)
        self.resumed = Resumed(path, self.step, self.total_steps)
        of = f" of {self.total_steps}" if self.total_steps is not None else ""
        message = f"{type(self).__name__}: resumed from {path} at step {self.step}{of}"
        if self.total_steps is not None and self.step >= self.total_steps:
            message += (": the checkpoint already holds the whole budget, so this fit trains nothing (the model now "
                        "holds the checkpoint's weights). Pass resume=False or another checkpoint_dir to train "
                        "afresh, or a larger budget to continue")
        logger.info(message)
        warnings.warn(message, ResumeWarning, stacklevel=user_stacklevel())
        return True

    def _epoch_batches(self, loader):
        """Iterate the loader with a data order fixed by (seed, epoch), skipping batches already trained on."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip = self.batch_in_epoch
        # Resumed mid-epoch: re-loading the skipped batches must not move the random streams (a dataset may
        # augment in __getitem__ with the global RNG), so they are put back before the first batch trained on.
        before_skip = capture_rng() if skip else None
        rng_state = torch.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + self.epoch)
        try:
            # Samplers draw their seed lazily, on the first next(): fetch it under the epoch's seed.
            iterator = iter(loader)
            first = next(iterator, _END)
        finally:
            torch.set_rng_state(rng_state)
        if first is _END:
            return
        for index, batch in enumerate(itertools.chain([first], iterator)):
            if index < skip:
                if index == skip - 1:
                    restore_rng(before_skip)
                continue
            yield batch

    def _reduce_logs(self, logs: dict) -> dict:
        values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in logs.items()}
        if is_distributed() and values:
            keys = sorted(values)
            t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                             device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            values = dict(zip(keys, (t / world_size()).tolist()))
        return values

    def fit(self, loader, epochs=None, steps=None, resume="auto"):
        """Train until ``epochs`` epochs or ``steps`` optimizer steps in total (counting resumed progress).

        Exactly one of ``epochs`` / ``steps`` (positive integers) may be given; with neither, one epoch. ``loader``
        yields ``(images, labels)`` batches, dicts, or what ``batch_fn``/``batch_keys`` read. Returns self.

        ``resume`` (when ``checkpoint_dir`` is set):

        - ``"auto"`` (default): continue from ``checkpoint_dir/checkpoint.pt`` when it exists, else start afresh —
          so re-running an interrupted script carries on. It is never silent, whatever ``progress`` is: the trainer
          warns "resumed from <path> at step N of M" (:class:`~fastood.trainers.resume.ResumeWarning`, also
          logged; it adds that nothing is left to train when the checkpoint holds the whole budget) and sets
          :attr:`resumed`; and it refuses (``ResumeMismatch``, naming the
          difference) a checkpoint of another method, other hyperparameters or another model structure.
        - ``True``: the same, but a missing checkpoint is an error (``FileNotFoundError``).
        - ``False``: start afresh; the old checkpoint is overwritten by this run's first write.

        SIGINT/SIGTERM during training finish the current step, write the checkpoint and raise
        :class:`~fastood.trainers.interrupt.TrainingInterrupted` (see ``handle_signals``).

        The model's train/eval modes (each submodule's, BatchNorm's included) are restored as they were when ``fit``
        was called, also when it raises.
        """
        if resume not in _RESUME_MODES or not isinstance(resume, (str, bool)):
            raise ValueError(f"resume must be 'auto', True or False, got {resume!r}")
        if epochs is not None and steps is not None:
            raise ValueError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps})")
        loader = self.batch_reader.labeled(loader, f"{type(self).__name__}.fit's loader")
        try:
            per_epoch = len(loader)
        except TypeError:
            per_epoch = None
        if per_epoch == 0:
            raise ValueError("loader is empty: it yields no batches")
        if steps is None:
            epochs = 1 if epochs is None else check_budget("epochs", epochs)
            if per_epoch is None:
                raise ValueError("loader has no len(); pass steps= instead of epochs=")
            total = epochs * per_epoch
        else:
            total = check_budget("steps", steps)
        self.check_optimizer()
        if self.checkpoint_dir is not None:
            check_writable(self.checkpoint_dir)  # fail now, not at the first checkpoint after hours of training
        self.resumed = None
        if resume is True and (self.checkpoint_path is None or not os.path.exists(self.checkpoint_path)):
            raise FileNotFoundError("fit(resume=True) needs a checkpoint to continue, but "
                                    + ("no checkpoint_dir was given" if self.checkpoint_path is None
                                       else f"{self.checkpoint_path} does not exist")
                                    + "; pass resume='auto' to start afresh when there is none")
        self.total_steps = total
        modes = capture_modes(unwrap(self.model))
        try:
            return self._fit(loader, total, per_epoch, resume)
        finally:
            restore_modes(modes)

    def _fit(self, loader, total, per_epoch, resume):
        if resume:
            self.resume()
        self._setup_schedule(total)
        self.model.train()
        self.on_fit_start(loader)
        bar = None
        if self.progress and rank() == 0 and self.step < total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=type(self).__name__, leave=False)
        fit_start = window = len(self.history)  # logs of the current epoch (mechanism check)
        self._last_save = time.monotonic()
        bn_swaps = None
        if self.sync_bn and is_distributed():
            from fastood.sync_batchnorm import convert_to_cross_rank

            bn_swaps = convert_to_cross_rank(unwrap(self.model))
        signals = StopSignals(self.handle_signals, announce=rank() == 0)
        try:
            signals.__enter__()
            while self.step < total:
                trained_this_epoch = False
                for batch in self._epoch_batches(loader):
                    self.check_data_range(batch[0])
                    logs = self._optimize(self.to_device(batch))
                    trained_this_epoch = True
                    if bar is not None:
                        bar.update(1)
                        keys = self.progress_keys or list(logs)[:4]
                        bar.set_postfix({k: f"{logs[k]:.3g}" for k in keys if k in logs})
                    if per_epoch is not None and self.batch_in_epoch >= per_epoch:
                        # Close the epoch as soon as its last batch is trained, so a fit that ends exactly
                        # on an epoch boundary leaves the counters pointing at the next epoch.
                        self._next_epoch()
                        self._check_mechanism(self.history[window:])
                        window = len(self.history)
                    if self.step >= total:
                        break
                    stop, due = self._agree(signals.received is not None, self._checkpoint_due())
                    if stop:
                        self.save_checkpoint()
                        raise TrainingInterrupted(signals.received or "a signal on another rank", self.step, total,
                                                  self.checkpoint_path)
                    if due or self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                else:
                    if self.batch_in_epoch > 0:  # loaders without len(): the epoch ends when they run dry
                        self._next_epoch()
                        self._check_mechanism(self.history[window:])
                        window = len(self.history)
                if not trained_this_epoch and self.step < total:
                    raise ValueError("loader yielded no batches")
        finally:
            signals.__exit__(None, None, None)
            if bn_swaps is not None:
                from fastood.sync_batchnorm import restore_batchnorm

                restore_batchnorm(bn_swaps)
            if bar is not None:
                bar.close()
            # Drop the DDP wrapper (the next fit makes a new one): a DistributedDataParallel reducer that outlives
            # destroy_process_group() aborted rank 0 at interpreter exit in about 1 run in 10 (gloo, torch 2.13).
            self._net = None
        if fit_start == window:  # no epoch closed in this fit: judge the whole (shorter) fit
            self._check_mechanism(self.history[window:])
        if self.checkpoint_path is None:
            self.check_finite()  # nothing to save, but a model that went to inf/NaN must not come back silently
        self.save_checkpoint()
        if signals.received is not None:  # the signal came during the last step: the work is saved, now stop
            raise TrainingInterrupted(signals.received, self.step, total, self.checkpoint_path)
        return self

    def _checkpoint_due(self) -> bool:
        return (self.checkpoint_minutes is not None and self.checkpoint_path is not None
                and time.monotonic() - self._last_save >= 60.0 * self.checkpoint_minutes)

    def _agree(self, *flags: bool):
        """``flags`` OR-ed over ranks (under DDP the ranks must stop and checkpoint at the same step, though
        each sees its own signals and clock); unchanged outside a process group."""
        if not is_distributed():
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v > 0) for v in t.tolist())

    def _next_epoch(self):
        self.epoch += 1
        self.batch_in_epoch = 0

    @staticmethod
    def _resolve_amp(amp, device) -> tuple:
        """``(enabled, info)`` of the ``amp`` argument on ``device``: bfloat16 autocast on CUDA, and on a CPU that
        computes bfloat16 natively; elsewhere off, with an :class:`AmpIgnoredWarning` when it was asked for."""
        if not isinstance(amp, bool):
            raise TypeError(f"amp must be True or False, got {amp!r}")
        if not amp:
            return False, "off"
        if device.type == "cuda":
            return True, "bf16 autocast (cuda)"
        if device.type == "cpu":
            from fastood.samplers.precision import cpu_bf16_native
            native, why = cpu_bf16_native()
            if native:
                return True, f"bf16 autocast (cpu: {why})"
            warnings.warn(f"amp=True ignored: this CPU has no native bfloat16 ({why}); emulated bfloat16 is slower "
                          "than float32, so training runs in float32", AmpIgnoredWarning, stacklevel=user_stacklevel())
            return False, f"off (asked; cpu: {why})"
        warnings.warn(f"amp=True ignored on device type {device.type!r} (bfloat16 autocast runs on cuda and cpu)",
                      AmpIgnoredWarning, stacklevel=user_stacklevel())
        return False, f"off (asked; device type {device.type})"

    def autocast(self):
        """The training step's autocast context: bfloat16 on the trainer's device when ``amp`` is on, else a
        context that leaves precision as it is."""
        if self.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def apply_bn_mode(self) -> None:
        """With ``freeze_bn``, put the BatchNorm layers in eval mode (done before every step, after ``train()``)."""
        if self.freeze_bn:
            freeze_batchnorm_(self.model)

    def _optimize(self, batch) -> dict:
        self.model.train()
        self.apply_bn_mode()
        # The forward pass updates BatchNorm running statistics (and other buffers) before the loss is known: keep
        # a copy so a non-finite batch leaves the model as it was (buffers are small next to the forward's cost).
        buffers = [b for b in unwrap(self.model).buffers()]
        saved = [b.detach().clone() for b in buffers]
        try:
            with self.autocast():
                out = self.training_step(batch)
        except (IndexError, RuntimeError, ValueError) as err:  # out-of-range labels: say so instead of torch's words
            clear = self.explain_batch_error(batch[0], batch[1], err) if len(batch) > 1 else None
            if clear is None:
                raise
            raise clear from err
        loss = out["loss"]
        (bad,) = self._agree(not bool(torch.isfinite(loss)))  # under DDP: every rank skips or stops together
        if bad:
            with torch.no_grad():
                for b, copy in zip(buffers, saved):
                    b.copy_(copy)
            return self._non_finite(batch, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.batch_in_epoch += 1
        logs = self._reduce_logs(out)
        logs["step"] = self.step
        if self.skipped_batches:
            logs["skipped_nonfinite"] = len(self.skipped_batches)
        self.history.append(logs)
        return logs

    def _non_finite(self, batch, loss) -> dict:
        """A batch whose loss is not finite (the buffers are already restored): skip it or raise, naming it."""
        images = first_item(batch)
        input_finite = None
        if isinstance(images, torch.Tensor) and (images.is_floating_point() or images.is_complex()):
            input_finite = bool(torch.isfinite(images).all())
        value = float(loss.detach()) if loss.numel() == 1 else float("nan")
        where = f"step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch} of the epoch)"
        if bool(torch.isfinite(loss.detach()).all()):
            cause = "another rank's batch gave a non-finite loss (this rank's loss and input are fine)"
        elif input_finite is False:
            cause = (f"the input batch itself holds {describe_non_finite(images)} non-finite: clean the data "
                     "(or skip such batches with skip_nonfinite=True)")
        elif input_finite is True:
            cause = ("the input batch is finite, so training diverged: lower lr (now "
                     f"{self.optimizer.param_groups[0]['lr']:g}), set grad_clip, or check the loss' inputs")
        else:
            cause = "the input batch could not be checked (not a floating-point tensor)"
        message = f"{type(self).__name__}: non-finite loss {value} at {where}; {cause}"
        if not self.skip_nonfinite:
            raise FloatingPointError(message + ". The model's buffers (BatchNorm statistics) were restored to "
                                               "their values before this batch; no update was made.")
        self.skipped_batches.append({"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch,
                                     "input_finite": input_finite})
        warnings.warn(message + f". Skipped (no update; {len(self.skipped_batches)} skipped so far)",
                      RuntimeWarning, stacklevel=user_stacklevel())
        logger.warning("%s. Skipped (%d so far)", message, len(self.skipped_batches))
        # The batch counts as a step without an update, so the budget, the schedule and resume stay aligned.
        self.step += 1
        self.batch_in_epoch += 1
        if self.scheduler is not None:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when the first batch is bad
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        logs = {"skipped_nonfinite": len(self.skipped_batches), "step": self.step}
        return logs

