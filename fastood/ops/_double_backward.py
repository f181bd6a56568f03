"""Differentiable backwards for the native ops: gradients of any order through the pure-PyTorch reference.

The native backward kernels are fast but opaque to autograd. When a backward must itself be differentiated
(``create_graph=True``: gradient penalties, Hessian-vector products), the ops' backward formulas are evaluated
with the reference's torch ops instead, and the native ``*_backward`` ops get an autograd formula the same way.
"""
import torch


def reference_vjp(fn, inputs, needs_input_grad, grad_output, *constants):
    """``d<grad_output, fn(*inputs, *constants)> / d inputs`` by autograd through ``fn`` (plain torch ops).

    When grad mode is on (a backward run with ``create_graph=True``) the result stays connected to ``inputs``'
    own graphs, so the next order works too. Entries of ``needs_input_grad`` that are False give None.
    """
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        args = [t if create and t.requires_grad else t.detach().requires_grad_(bool(need))
                for t, need in zip(inputs, needs_input_grad)]
        wrt = [a for a, need in zip(args, needs_input_grad) if need]
        if not wrt:
            return tuple(None for _ in inputs)
        grads = iter(torch.autograd.grad(fn(*args, *constants), wrt, grad_output, create_graph=create,
                                         allow_unused=True))
    out = []
    for t, need in zip(args, needs_input_grad):
        g = next(grads) if need else None
        out.append(torch.zeros_like(t) if need and g is None else g)
    return tuple(out)
