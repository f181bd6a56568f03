"""Run a model as a fixed function of its input: eval mode and no parameter gradients, restored afterwards."""
import contextlib

from torch import nn

from fastood._modes import eval_mode


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter; both restored on exit, also on exceptions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
