"""BatchNorm statistics over the global batch under DDP, on every backend (gloo on CPU included).

Under plain DDP every rank normalizes with the statistics of its own shard and DDP then copies rank 0's running
statistics to all ranks, so a 2-rank run is *not* the same computation as one process on the global batch
(measured: parameters 2e-2 apart after a few steps of a BatchNorm CNN). ``Trainer(sync_bn=True)`` swaps every
BatchNorm layer's forward for :func:`cross_rank_batch_norm` while training under a process group, which computes the batch
mean and (biased) variance over all ranks, differentiably: the result equals one process on the global batch
within float rounding. ``torch.nn.SyncBatchNorm`` does the same but only on CUDA; this module is backend-agnostic
(two small all-reduces per layer and step: the sum, then the sum of squared deviations — two passes, as a
single process computes the variance, so large means do not cancel catastrophically).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["cross_rank_batch_norm", "convert_to_cross_rank", "restore_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Each rank's loss depends on the sum, so the gradient reaching one rank's summand is the sum
    of every rank's gradient w.r.t. the sum: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


def cross_rank_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with the batch statistics of the global batch (all ranks) in training mode; in eval mode,
    outside a process group or with one rank, the layer's own forward."""
    synced = bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not synced:
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
    sums = _all_reduce_sum(torch.cat([xf.sum(dims), count]))
    n = sums[-1]
    mean = sums[:-1] / n
    centered = xf - mean.reshape(shape)
    var = _all_reduce_sum(centered.pow(2).sum(dims)) / n  # biased: what normalizes the batch
    out = centered * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.affine:
        out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            unbiased = var.detach() * (n / (n - 1)) if float(n) > 1 else var.detach()
            bn.running_mean.mul_(1 - momentum).add_(mean.detach().to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return out.to(x.dtype)


def convert_to_cross_rank(model: nn.Module) -> list:
    """Make every BatchNorm layer of ``model`` normalize with global-batch statistics, in place, by giving the
    layer instance a cross-rank ``forward``: module names, ``state_dict`` keys and parameters stay as they are, so
    checkpoints and the optimizer are unaffected. Returns the layers for :func:`restore_batchnorm`."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and "forward" not in vars(m)]
    for bn in layers:
        bn.forward = functools.partial(cross_rank_batch_norm, bn)
    return layers


def restore_batchnorm(layers: list) -> None:
    """Undo :func:`convert_to_cross_rank` (the layers keep their trained parameters and statistics)."""
    for bn in layers:
        vars(bn).pop("forward", None)
