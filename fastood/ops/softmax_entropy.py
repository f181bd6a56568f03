"""Entropy of the softmax, ``H(p) = -sum_k p_k log p_k`` (FIG Algorithm 2's penalty)."""
import torch

from . import reference
from ._double_backward import reference_vjp
from ._backend import native_available, use_native
from ._checks import check_tensor


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of ``softmax(logits)``, differentiable and stable for logits up to +-1e4.

    Args:
        logits: [B, C] float16/bfloat16/float32/float64 (accumulated in float32 or float64).
    Returns:
        [B] entropies in nats, dtype of ``logits``.

    Differentiable to any order: the first backward runs the native kernel; under ``create_graph=True`` the
    backward is evaluated with the reference's torch ops, so it can be differentiated again.
    """
    check_tensor("logits", logits, dims=2)
    if use_native(logits):
        return torch.ops.fastood.softmax_entropy(logits)
    return reference.softmax_entropy(logits)


if native_available():
    @torch.library.register_fake("fastood::softmax_entropy")
    def _fake_entropy(logits):
        return logits.new_empty(logits.shape[:1])

    @torch.library.register_fake("fastood::softmax_entropy_backward")
    def _fake_entropy_backward(grad_entropy, logits):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        (logits,) = inputs
        ctx.save_for_backward(logits)

    def _backward(ctx, grad_entropy):
        (logits,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            return reference.softmax_entropy_backward(grad_entropy, logits)
        return torch.ops.fastood.softmax_entropy_backward(grad_entropy, logits)

    torch.library.register_autograd("fastood::softmax_entropy", _backward, setup_context=_setup_context)

    def _setup_context_bw(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward_bw(ctx, grad):
        return reference_vjp(reference.softmax_entropy_backward, ctx.saved_tensors, ctx.needs_input_grad, grad)

    torch.library.register_autograd("fastood::softmax_entropy_backward", _backward_bw,
                                    setup_context=_setup_context_bw)
