"""The training loop every fastood method shares: optimization, progress, checkpoints, resume, DDP.

A method subclasses :class:`Trainer` and implements :meth:`Trainer.training_step`; everything else
(epochs or a step budget, checkpointing, exact resume, distributed data parallel) lives here.
"""
import itertools
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_END = object()


class MechanismIdleWarning(RuntimeWarning):
    """A trainer's method-specific mechanism (Langevin updates, an outlier term, ...) stayed off for a whole
    epoch (or a whole fit shorter than one): the run trains, but not the way its paper does."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def first_item(batch):
    """The image batch of a loader item: a tensor, or the first item of a tuple/list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


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


def capture_rng() -> dict:
    """This process's torch, numpy, python and CUDA random states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    # .cpu(): a checkpoint loaded with map_location="cuda" carries the state tensors on the GPU.
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])


class Trainer:
    """Base trainer.

    Args:
        model: the network to train (its parameters are optimized in place).
        lr, momentum, weight_decay: SGD hyperparameters used by :meth:`configure_optimizer`.
        optimizer: an optimizer over ``model``'s parameters, overriding the SGD default.
        checkpoint_dir: where ``checkpoint.pt`` is written every ``checkpoint_every`` steps and at the end;
            if it holds a checkpoint when :meth:`fit` starts, training resumes from it exactly
            (model, optimizer, step, position in the epoch, RNG states, method state).
        progress: show a tqdm progress bar (rank 0 only).
        seed: seeds the per-epoch data order, so a resumed run sees the same batches.
        device: where to train; default: the model's device.
        grad_clip: optional max gradient norm.
        amp: on CUDA, run forward passes under bfloat16 autocast (ignored on CPU).
        freeze_bn: keep every BatchNorm layer in eval mode while training (running statistics fixed and used for
            normalization; the affine weights still train), so outliers or generated images in a batch cannot
            shift the ID features' normalization. Default False (fine-tuning trainers that mix outliers into
            the batch turn it on by default, and say so).

    Under ``torchrun`` (an initialized process group) the model is wrapped in
    DistributedDataParallel, checkpoints are written by rank 0 and logged metrics are all-reduced.
    Loaders should then use a ``DistributedSampler``; its ``set_epoch`` is called every epoch.
    """

    default_lr = 0.1
    #: log keys shown in the progress bar (None: the first four of each step's logs)
    progress_keys = None

    def __init__(self, model: nn.Module, *, lr=None, momentum=0.9, weight_decay=5e-4, optimizer=None,
                 checkpoint_dir=None, checkpoint_every=100, progress=True, seed=0, device=None, grad_clip=None,
                 amp=False, freeze_bn=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.device = torch.device(device) if device is not None else model_device(model)
        self.model.to(self.device)
        self.lr = self.default_lr if lr is None else float(lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.checkpoint_dir = checkpoint_dir
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress
        self.seed = int(seed)
        self.grad_clip = grad_clip
        self.amp = bool(amp) and self.device.type == "cuda"
        self.freeze_bn = bool(freeze_bn)
        self._optimizer = optimizer
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
        """An LR scheduler stepped after every optimizer step, or None (default: constant LR)."""
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
            warnings.warn(f"{type(self).__name__}: {message}", MechanismIdleWarning, stacklevel=3)

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
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "history": list(self.history),
            "rng": capture_rng(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = list(state["history"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and is_distributed() and len(per_rank) == world_size():
            restore_rng(per_rank[rank()])  # each rank continues its own random stream (per-rank sampler seeds)
        else:
            restore_rng(state["rng"])
        self.load_extra_state(state.get("extra", {}))

    @property
    def checkpoint_path(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "checkpoint.pt")

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (rank 0 writes; under DDP every rank must call it, since the ranks'
        RNG states are gathered into it so that a resumed run continues each rank's own random stream)."""
        if self.checkpoint_path is None:
            return
        per_rank = None
        if is_distributed():
            per_rank = [None] * world_size()
            dist.all_gather_object(per_rank, capture_rng())
        if rank() != 0:
            return
        state = self.state_dict()
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def resume(self) -> bool:
        """Load ``checkpoint_dir/checkpoint.pt`` if it exists. Returns whether it did."""
        path = self.checkpoint_path
        if path is None or not os.path.exists(path):
            return False
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
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

    def fit(self, loader, epochs=None, steps=None, resume=True):
        """Train until ``epochs`` epochs or ``steps`` optimizer steps in total (counting resumed progress).

        Exactly one of ``epochs`` / ``steps`` may be given; with neither, one epoch. With ``resume`` (default)
        and a checkpoint in ``checkpoint_dir``, training continues exactly where it stopped. Returns self.
        """
        if epochs is not None and steps is not None:
            raise ValueError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps})")
        try:
            per_epoch = len(loader)
        except TypeError:
            per_epoch = None
        if per_epoch == 0:
            raise ValueError("loader is empty: it yields no batches")
        if steps is None:
            epochs = 1 if epochs is None else int(epochs)
            if epochs < 0:
                raise ValueError(f"epochs must be >= 0, got {epochs}")
            if per_epoch is None:
                raise ValueError("loader has no len(); pass steps= instead of epochs=")
            total = epochs * per_epoch
        else:
            total = int(steps)
            if total < 0:
                raise ValueError(f"steps must be >= 0, got {steps}")
        if self.total_steps != total:
            self.total_steps = total
            self.scheduler = self.configure_scheduler(self.optimizer, total)
        if resume:
            self.resume()
        self.model.train()
        self.on_fit_start(loader)
        bar = None
        if self.progress and rank() == 0 and self.step < total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=type(self).__name__, leave=False)
        fit_start = window = len(self.history)  # logs of the current epoch (mechanism check)
        try:
            while self.step < total:
                trained_this_epoch = False
                for batch in self._epoch_batches(loader):
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
                    if self.step % self.checkpoint_every == 0 and self.step < total:
                        self.save_checkpoint()
                    if self.step >= total:
                        break
                else:
                    if self.batch_in_epoch > 0:  # loaders without len(): the epoch ends when they run dry
                        self._next_epoch()
                        self._check_mechanism(self.history[window:])
                        window = len(self.history)
                if not trained_this_epoch and self.step < total:
                    raise ValueError("loader yielded no batches")
        finally:
            if bar is not None:
                bar.close()
            # Drop the DDP wrapper (the next fit makes a new one): a DistributedDataParallel reducer that outlives
            # destroy_process_group() aborted rank 0 at interpreter exit in about 1 run in 10 (gloo, torch 2.13).
            self._net = None
        if fit_start == window:  # no epoch closed in this fit: judge the whole (shorter) fit
            self._check_mechanism(self.history[window:])
        self.save_checkpoint()
        return self

    def _next_epoch(self):
        self.epoch += 1
        self.batch_in_epoch = 0

    def apply_bn_mode(self) -> None:
        """With ``freeze_bn``, put the BatchNorm layers in eval mode (done before every step, after ``train()``)."""
        if self.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _optimize(self, batch) -> dict:
        self.model.train()
        self.apply_bn_mode()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.training_step(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{type(self).__name__}: non-finite loss {float(loss.detach())} at step {self.step}")
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
        self.history.append(logs)
        return logs

