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
    backward is evaluated with the reference's torch ops, so it can be differentiated again. On CPU and CUDA, when a
    backward will follow (float32/bfloat16/float16 logits that require grad, grad mode on), the forward also
    writes dH/df from the exps it has in hand (``fastood::softmax_entropy_with_grad``; a float32 [B, C] tensor
    kept until the backward) and the backward only scales its rows: on CPU forward + backward 1.3-1.5x faster
    than a backward that repeats the forward's pass (``bench/bench_ops.py``); on CUDA the backward reads B*C floats
    instead of re-reading the logits and recomputing their max, exps and sums (issue 22; timed by gpu-check).
    """
    check_tensor("logits", logits, dims=2)
    if use_native(logits):
        if _forward_computes_grad(logits):
            return torch.ops.fastood.softmax_entropy_with_grad(logits)[0]
        return torch.ops.fastood.softmax_entropy(logits)
    return reference.softmax_entropy(logits)


_WITH_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The built extension has the with-gradient ops (one built before them has not), and on which device types (a CUDA
# build before issue 22 has them on CPU only); looked up once, not per call.
_HAS_WITH_GRAD = native_available() and hasattr(torch.ops.fastood, "softmax_entropy_with_grad")


def _with_grad_kernel(key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("fastood::softmax_entropy_with_grad", key)
                    and torch._C._dispatch_has_kernel_for_dispatch_key("fastood::softmax_entropy_backward_from_grad",
                                                                       key))
    except (AttributeError, RuntimeError):  # no such private API: assume the CPU ops only (the older builds)
        return key == "CPU"


_WITH_GRAD_DEVICES = tuple(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                           if _HAS_WITH_GRAD and _with_grad_kernel(key))


def _forward_computes_grad(logits: torch.Tensor) -> bool:
    """Whether the forward should also compute dH/df (CPU or CUDA float32/bfloat16/float16 logits that a backward
    will follow): the forward has every exp in hand, so the backward becomes a row scaling instead of a second
    pass. Costs a float32 [B, C] tensor kept for the backward (the reference's autograd keeps two)."""
    return (logits.device.type in _WITH_GRAD_DEVICES and logits.dtype in _WITH_GRAD_DTYPES and logits.requires_grad
            and torch.is_grad_enabled())

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

    if _HAS_WITH_GRAD:  # CPU (csrc/cpu/softmax_entropy.cpp) and CUDA (csrc/cuda/softmax_entropy.cpp)
        @torch.library.register_fake("fastood::softmax_entropy_with_grad")
        def _fake_entropy_with_grad(logits):
            return (logits.new_empty(logits.shape[:1]),
                    torch.empty(logits.shape, dtype=torch.float32, device=logits.device))

        @torch.library.register_fake("fastood::softmax_entropy_backward_from_grad")
        def _fake_entropy_backward_from_grad(grad_entropy, dentropy, dtype):
            return torch.empty(dentropy.shape, dtype=dtype, device=dentropy.device)

        def _setup_context_with_grad(ctx, inputs, output):
            (logits,) = inputs
            _, dentropy = output
            ctx.mark_non_differentiable(dentropy)
            ctx.dtype = logits.dtype
            ctx.save_for_backward(logits, dentropy)

        def _backward_with_grad(ctx, grad_entropy, _grad_dentropy):
            logits, dentropy = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
                return reference.softmax_entropy_backward(grad_entropy, logits)
            return torch.ops.fastood.softmax_entropy_backward_from_grad(grad_entropy, dentropy, ctx.dtype)

        torch.library.register_autograd("fastood::softmax_entropy_with_grad", _backward_with_grad,
                                        setup_context=_setup_context_with_grad)
