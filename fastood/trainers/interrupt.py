"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (pre-emption, ``kill``, ``torchrun`` shutdown).

While :meth:`Trainer.fit` runs, :class:`StopSignals` turns the first SIGINT/SIGTERM into a request: the step
in progress finishes, the trainer writes its checkpoint and raises :class:`TrainingInterrupted`. A second
signal of a kind already received aborts at once with a plain ``KeyboardInterrupt`` (nothing more is written;
the last checkpoint stays). A SIGINT followed by a SIGTERM is still one request: that is what one Ctrl-C under
``torchrun`` delivers (the terminal's SIGINT, then torchrun's SIGTERM to its workers).
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["TrainingInterrupted", "StopSignals"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after finishing a step and writing the checkpoint.

    Attributes: ``signal`` (e.g. ``"SIGTERM"``), ``step``, ``total_steps``, ``checkpoint`` (the path written, or
    None when the trainer has no ``checkpoint_dir``)."""

    def __init__(self, signal_name: str, step: int, total_steps, checkpoint):
        self.signal, self.step, self.total_steps, self.checkpoint = signal_name, step, total_steps, checkpoint
        where = f"step {step}" + (f" of {total_steps}" if total_steps is not None else "")
        saved = (f"checkpoint written to {checkpoint}; fit() again with the same settings continues from it"
                 if checkpoint else "no checkpoint_dir was set, so nothing was saved")
        super().__init__(f"training stopped by {signal_name} after {where}: {saved}")

    def __str__(self):
        return self.args[0]


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`received` (the signal's name) instead of stopping the process.

    Installs handlers only in the main thread (Python allows no other) and only when ``enabled``; the previous
    handlers are restored on exit. ``announce``: print one line on the first signal (rank 0)."""

    def __init__(self, enabled: bool = True, announce: bool = True):
        self.enabled, self.announce = enabled, announce
        self.received = None
        self._seen = set()
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name in self._seen:  # asked again: stop now
            self._restore()
            raise KeyboardInterrupt(f"{name} received twice: aborted without writing a checkpoint")
        self._seen.add(name)
        if self.received is not None:
            return
        self.received = name
        if self.announce:
            print(f"\nfastood: {name} received: finishing the current step and writing the checkpoint "
                  "(send it again to abort at once)", file=sys.stderr, flush=True)

    def _restore(self):
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            except (ValueError, OSError, TypeError):
                pass
        self._previous = {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (ValueError, OSError):  # e.g. an embedded interpreter without signal support
                    pass
        return self

    def __exit__(self, *exc):
        self._restore()
        return False
