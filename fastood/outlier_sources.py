"""Where outliers come from: a loader of auxiliary images or a sampler that generates them, behind one interface.

    source = as_outlier_source(loader_or_sampler)
    x_out = source.draw(n, model, shape, context=(x, y))     # [m, *shape]

- :class:`LoaderOutlierSource` wraps a DataLoader (or any re-iterable of image batches, or of tuples whose first
  item is the image batch). It cycles forever: at the end of the loader it starts a new pass ("outlier epoch").
  By default it returns the loader's batches as they come and ignores ``n``; with ``exact=True`` it returns
  exactly ``n`` images per draw, joining and splitting batches.
- :class:`SamplerOutlierSource` wraps anything with ``sample(model, n, shape, context=None)`` (the samplers of
  :mod:`fastood.samplers`: Langevin, Gaussian noise, manifold, class-mix) and returns exactly ``n`` samples.

So ICE, OE or Energy-OE can run on an auxiliary data set or on FIG's generated outliers alike.

Resume. ``state_dict()`` holds the source's position: ``batches_drawn`` (loader batches fetched, or sampler calls,
since the start of training). A loader source also records its outlier epoch, the batch index inside it and how
many images of the last batch are still unused (``exact=True``); the order of every pass is fixed by
``(seed, outlier epoch)`` (torch's RNG is seeded while the pass's iterator starts, and a ``DistributedSampler``
gets ``set_epoch``), so after ``load_state_dict`` the next draw fast-forwards a fresh pass to the same batch and
continues exactly where the interrupted run stopped. A sampler source stores the sampler's own state
(``state_dict()`` if it has one, else its replay ``buffer``); its randomness comes from torch's global RNG,
which the Trainer's checkpoint restores.

The outlier-exposure objectives (:mod:`fastood.objectives`) draw from such a source, and
:class:`fastood.trainers.outliers.OutlierTrainer` is the Trainer base of the methods that consume one each step
(this module's names are re-exported there).
"""
import torch

from fastood._rng import capture_rng, restore_rng

_FIRST = object()


def _shape_tuple(shape):
    return None if shape is None else tuple(int(s) for s in shape)


class OutlierSource:
    """Interface: ``draw(n, model, shape, context=None) -> Tensor [m, *shape]`` (detached) plus resume state.

    ``n``: images wanted (a loader source in its default mode returns its own batch size instead);
    ``model``: the classifier being trained (samplers such as Langevin need it); ``shape``: the image shape
    (C, H, W); ``context``: the current ID batch ``(x, y)`` (the manifold sampler perturbs it).
    """

    batches_drawn = 0

    def draw(self, n, model, shape, context=None) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = int(state.get("batches_drawn", 0))


class LoaderOutlierSource(OutlierSource):
    """Outliers from a re-iterable of image batches (a DataLoader), cycled forever.

    Args:
        loader: yields tensors [b, *shape] or tuples/lists whose first item is that tensor (labels are ignored).
        exact: False (default): each draw returns the next batch as it is, ignoring ``n``.
            True: each draw returns exactly ``n`` images, taken in order across batch boundaries.
        seed: fixes the data order of every pass (with the pass number), for exact resume.
    """

    def __init__(self, loader, exact: bool = False, seed: int = 0):
        if isinstance(loader, torch.Tensor) or not hasattr(loader, "__iter__"):
            raise TypeError("outliers must be a DataLoader / re-iterable of image batches or a sampler with "
                            f"sample(model, n, shape, context=None), got {type(loader).__name__}"
                            + (" (wrap a tensor of images as DataLoader(TensorDataset(images), batch_size=...))"
                               if isinstance(loader, torch.Tensor) else ""))
        self.loader, self.exact, self.seed = loader, bool(exact), int(seed)
        self.batches_drawn = 0      # batches fetched from the loader since the start of training
        self.epoch = 0              # passes over the loader started so far, minus one (the current pass)
        self.batch_in_epoch = 0     # batches fetched in the current pass
        self._iterator = None
        self._pending = None        # unused tail of the last fetched batch (exact mode)
        self._restore_pending = 0   # after load_state_dict: rows of the last batch still unused
        self._rows_this_pass = 0

    # ------------------------------------------------------------------ iteration
    def _pass_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch + 7_919) % (2 ** 63)

    def _start_pass(self, epoch: int):
        """A fresh iterator over the loader for pass ``epoch``, ordered by (seed, epoch); returns its first item."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        rng_state = torch.get_rng_state()
        torch.manual_seed(self._pass_seed(epoch))
        try:
            # Samplers draw their seed lazily, on the first next(): fetch it under the pass's seed.
            iterator = iter(self.loader)
            first = next(iterator, _FIRST)
        finally:
            torch.set_rng_state(rng_state)
        return iterator, first

    def _begin_next_pass(self):
        """Start pass ``epoch + 1`` and return its first item."""
        self._rows_this_pass = 0
        self.epoch += 1
        self.batch_in_epoch = 0
        self._iterator, item = self._start_pass(self.epoch)
        if item is _FIRST:
            raise ValueError("outlier loader yielded no batches")
        return item

    def _next_batch(self) -> torch.Tensor:
        """The next image batch, starting a new pass at the end of the loader (or fast-forwarding after a resume)."""
        if self._iterator is None:
            skip = self.batch_in_epoch
            before_skip = capture_rng() if skip else None
            self._iterator, item = self._start_pass(self.epoch)
            if item is _FIRST:
                raise ValueError("outlier loader yielded no batches")
            for index in range(skip):  # resumed mid-pass: skip what the interrupted run consumed
                if index == skip - 1:  # re-loading skipped batches must not move the random streams
                    restore_rng(before_skip)
                item = next(self._iterator, _FIRST)
                if item is _FIRST and index == skip - 1:
                    # The interrupted run had consumed this pass exactly: it would have started the next one here.
                    item = self._begin_next_pass()
                elif item is _FIRST:
                    raise ValueError(f"cannot resume the outlier loader at batch {self.batch_in_epoch} of pass "
                                     f"{self.epoch}: it is shorter now")
        else:
            item = next(self._iterator, _FIRST)
            if item is _FIRST:
                if self._rows_this_pass == 0:
                    raise ValueError("outlier loader yields only empty batches")
                item = self._begin_next_pass()
        self.batches_drawn += 1
        self.batch_in_epoch += 1
        x = self._images(item)
        self._rows_this_pass += x.shape[0]
        return x

    @staticmethod
    def _images(item) -> torch.Tensor:
        if isinstance(item, dict):  # dict batches: the image key found as everywhere else (fastood.batches)
            from fastood.batches import BatchReader

            return BatchReader().images(item, "the outlier loader")
        x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
        if not isinstance(x, torch.Tensor):
            raise TypeError("the outlier loader must yield image tensors or tuples whose first item is the image "
                            f"tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("the outlier loader yielded a 0-d tensor; expected an image batch [b, *shape]")
        return x

    # ------------------------------------------------------------------ drawing
    def draw(self, n=None, model=None, shape=None, context=None) -> torch.Tensor:
        """The next batch (``exact=False``), or exactly ``n`` images (``exact=True``), on the loader's device.

        ``shape``, when given, must match the images' shape. ``model`` and ``context`` are ignored.
        """
        if self._restore_pending:
            self._recover_pending()
        if not self.exact:
            x = self._next_batch()
        else:
            if n is None or isinstance(n, bool) or int(n) != n or n < 0:
                raise ValueError(f"n must be an int >= 0 for an exact-size outlier loader, got {n!r}")
            n, parts, have = int(n), [], 0
            while have < n:
                if self._pending is None or self._pending.shape[0] == 0:
                    self._pending = self._next_batch()
                    continue
                take = self._pending[: n - have]
                self._pending = self._pending[take.shape[0]:]
                parts.append(take)
                have += take.shape[0]
            x = torch.cat(parts) if parts else self._empty_like_loader(shape)
        shape = _shape_tuple(shape)
        if shape is not None and x.shape[0] and tuple(x.shape[1:]) != shape:
            raise ValueError(f"outlier images have shape {tuple(x.shape[1:])} but the ID images have {shape}")
        return x.detach()

    def _empty_like_loader(self, shape):
        if self._pending is not None:
            return self._pending[:0]
        return torch.zeros((0,) + (_shape_tuple(shape) or ()))

    def _recover_pending(self):
        """After a resume in exact mode: re-fetch the last batch of the interrupted run and keep its unused tail."""
        keep = self._restore_pending
        self._restore_pending = 0
        self.batch_in_epoch -= 1
        self.batches_drawn -= 1
        batch = self._next_batch()
        self._pending = batch[batch.shape[0] - keep:]

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        pending = self._restore_pending or (0 if self._pending is None else int(self._pending.shape[0]))
        return {"batches_drawn": self.batches_drawn, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "pending": pending, "exact": self.exact, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the next :meth:`draw` fast-forwards a fresh pass to it."""
        if bool(state.get("exact", self.exact)) != self.exact:
            raise ValueError(f"outlier source state was saved with exact={state.get('exact')}, "
                             f"this source has exact={self.exact}")
        self.batches_drawn = int(state.get("batches_drawn", 0))
        self.epoch = int(state.get("epoch", 0))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.seed = int(state.get("seed", self.seed))
        self._iterator, self._pending = None, None
        self._rows_this_pass = 1  # unknown for the part of the pass the interrupted run consumed; assume non-empty
        self._restore_pending = int(state.get("pending", 0)) if self.batch_in_epoch > 0 else 0

    def __repr__(self):
        return f"LoaderOutlierSource({type(self.loader).__name__}, exact={self.exact}, seed={self.seed})"


class SamplerOutlierSource(OutlierSource):
    """Outliers generated by a sampler: ``sampler.sample(model, n, shape, context=context)`` (exactly ``n``).

    The samples are detached and the model's modes/flags are the sampler's responsibility (see the sampler
    protocol). ``stats`` forwards the sampler's description of its last call.
    """

    def __init__(self, sampler):
        if not callable(getattr(sampler, "sample", None)):
            raise TypeError("a sampler needs a sample(model, n, shape, context=None) method, "
                            f"got {type(sampler).__name__}")
        self.sampler = sampler
        self.batches_drawn = 0

    @property
    def stats(self) -> dict:
        return getattr(self.sampler, "stats", {}) or {}

    def draw(self, n, model, shape, context=None) -> torch.Tensor:
        if n is None or isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        n = int(n)
        shape = _shape_tuple(shape)
        if context is None:
            x = self.sampler.sample(model, n, shape)
        else:
            x = self.sampler.sample(model, n, shape, context=context)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self.sampler).__name__}.sample returned {type(x).__name__}, expected a tensor")
        if x.dim() == 0 or x.shape[0] != n:
            raise ValueError(f"{type(self.sampler).__name__}.sample(n={n}) returned shape {tuple(x.shape)}, "
                             f"expected [{n}, *shape]")
        self.batches_drawn += 1
        return x.detach()

    def state_dict(self) -> dict:
        state = {"batches_drawn": self.batches_drawn}
        if callable(getattr(self.sampler, "state_dict", None)):
            state["sampler"] = self.sampler.state_dict()
        elif hasattr(self.sampler, "buffer"):
            state["buffer"] = self.sampler.buffer
        return state

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = int(state.get("batches_drawn", 0))
        if "sampler" in state and callable(getattr(self.sampler, "load_state_dict", None)):
            self.sampler.load_state_dict(state["sampler"])
        elif "buffer" in state and hasattr(self.sampler, "buffer"):
            self.sampler.buffer = state["buffer"]

    def __repr__(self):
        return f"SamplerOutlierSource({type(self.sampler).__name__})"


def as_outlier_source(obj, exact: bool = False, seed: int = 0) -> OutlierSource:
    """An :class:`OutlierSource` for ``obj``: returned as is if it already is one; a sampler (anything with a
    ``sample`` method) becomes a :class:`SamplerOutlierSource`; a DataLoader or other re-iterable of image batches
    becomes a :class:`LoaderOutlierSource` (``exact`` and ``seed`` apply to it only)."""
    if isinstance(obj, OutlierSource):
        return obj
    if callable(getattr(obj, "sample", None)):
        return SamplerOutlierSource(obj)
    return LoaderOutlierSource(obj, exact=exact, seed=seed)


__all__ = ["OutlierSource", "LoaderOutlierSource", "SamplerOutlierSource", "as_outlier_source"]
