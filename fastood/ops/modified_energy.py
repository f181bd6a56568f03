"""FIG modified energy (DESIGN.md, method 1): ``E(x) = sum_y (f_y/c) (1 - exp(f_y/c))``."""
import torch

from . import reference
from ._double_backward import reference_vjp
from ._backend import native_available, use_native
from ._checks import check_positive, check_tensor


def _check(logits, c):
    check_tensor("logits", logits, dims=2)
    return check_positive("c", c)


def modified_energy(logits: torch.Tensor, c: float = 5.0) -> torch.Tensor:
    """Per-row modified energy ``E = sum_y (f_y/c) (1 - exp(f_y/c))``, differentiable (backward kernel).

    Differentiable to any order: under ``create_graph=True`` the backward is evaluated with the reference's torch
    ops (``fastood.ops.reference.modified_energy_backward``), so it can be differentiated again.

    Args:
        logits: [B, C] float16/bfloat16/float32/float64 (accumulated in float32 or float64).
        c: temperature-like constant (paper: 5).
    Returns:
        [B] energies, dtype of ``logits``.
    """
    c = _check(logits, c)
    if use_native(logits):
        return torch.ops.fastood.modified_energy(logits, c)
    return reference.modified_energy(logits, c)


def modified_energy_grad(logits: torch.Tensor, c: float = 5.0):
    """Energy and its gradient with respect to the logits in one pass, without autograd.

    ``dE/df_y = (1/c) (1 - (1 + f_y/c) exp(f_y/c))``. Neither output is part of the autograd graph (use
    :func:`modified_energy` for a differentiable energy); the gradient is meant to be pushed on through the
    network, e.g. ``torch.autograd.grad(logits, x, grad_outputs=dE_df)``.

    Args:
        logits: [B, C] float16/bfloat16/float32/float64 (accumulated in float32 or float64).
        c: temperature-like constant (paper: 5).
    Returns:
        ``(E [B], dE/dlogits [B, C])``, both in the dtype of ``logits``.
    """
    c = _check(logits, c)
    logits = logits.detach()
    if use_native(logits):
        return torch.ops.fastood.modified_energy_grad(logits, c)
    return reference.modified_energy_grad(logits, c)


if native_available():
    @torch.library.register_fake("fastood::modified_energy")
    def _fake_energy(logits, c):
        return logits.new_empty(logits.shape[:1])

    @torch.library.register_fake("fastood::modified_energy_backward")
    def _fake_energy_backward(grad_energy, logits, c):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastood::modified_energy_grad")
    def _fake_energy_grad(logits, c):
        return logits.new_empty(logits.shape[:1]), torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        logits, c = inputs
        ctx.save_for_backward(logits)
        ctx.c = c

    def _backward(ctx, grad_energy):
        (logits,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            return reference.modified_energy_backward(grad_energy, logits, ctx.c), None
        return torch.ops.fastood.modified_energy_backward(grad_energy, logits, ctx.c), None

    torch.library.register_autograd("fastood::modified_energy", _backward, setup_context=_setup_context)

    def _setup_context_bw(ctx, inputs, output):
        grad_energy, logits, c = inputs
        ctx.save_for_backward(grad_energy, logits)
        ctx.c = c

    def _backward_bw(ctx, grad):
        grads = reference_vjp(reference.modified_energy_backward, ctx.saved_tensors, ctx.needs_input_grad[:2], grad,
                              ctx.c)
        return grads + (None,)

    torch.library.register_autograd("fastood::modified_energy_backward", _backward_bw,
                                    setup_context=_setup_context_bw)
