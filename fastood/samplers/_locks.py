"""One sampling call at a time per model and per sampler object, across threads.

A sampler switches the model it runs into eval mode with ``requires_grad=False`` and back (``frozen``), may move
its parameters to channels-last, and caches per-model state (the folded-BatchNorm view, whose tracing patches
``torch.nn.Module.__call__`` for every thread while it runs). Two threads doing this to one model at once restore
each other's saved flags (the model ends up frozen and in eval mode) or break each other's trace. A reentrant lock
per model and per sampler serializes exactly those calls; calls on different models with different samplers still
run concurrently. Locks are always taken model first, then sampler, so two calls cannot wait on each other.
"""
import functools
import threading
import weakref

_locks = weakref.WeakKeyDictionary()   # object -> RLock; an entry goes when its model/sampler is collected
_guard = threading.Lock()


def lock_for(obj) -> threading.RLock:
    """The reentrant lock of ``obj`` (created on first use)."""
    with _guard:
        lock = _locks.get(obj)
        if lock is None:
            lock = _locks[obj] = threading.RLock()
        return lock


def one_call_per_model(method):
    """Decorate ``sample(self, model, ...)``: hold ``model``'s lock, then the sampler's, for the whole call.
    A ``model`` that cannot be weakly referenced (not a module: ``sample`` itself raises a clear TypeError) is
    not locked."""

    @functools.wraps(method)
    def locked(self, model, *args, **kwargs):
        try:
            model_lock = lock_for(model)
        except TypeError:
            return method(self, model, *args, **kwargs)
        with model_lock, lock_for(self):
            return method(self, model, *args, **kwargs)

    return locked
