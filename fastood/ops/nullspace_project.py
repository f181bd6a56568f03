"""Batched projection onto the left null space of a Jacobian (Vernekar et al., type-I outliers)."""
import torch

from . import reference
from .reference import pow2_scale
from ._backend import native_available, use_native
from ._checks import check_same_device, check_tensor

MAX_LATENT = 64


def nullspace_project(jac: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``v = P r / |P r|``, ``P = I - J (J^T J)^-1 J^T``, one per sample (Vernekar et al. 2019,
    type-I outliers: ``v`` is a random direction in the left null space of the decoder Jacobian ``J = dg/dz``).

    Args:
        jac: [B, D, d] decoder Jacobians (float32/float64, any strides), 1 <= d <= 64 and D > d.
        r:   [B, D] directions (typically N(0, I_D)), same dtype and device as ``jac``.
    Returns:
        [B, D] contiguous unit vectors orthogonal to the columns of J, dtype of ``r``. With r ~ N(0, I) they are
        uniform on the unit sphere of the null space (E[v v^T] = P / (D - d)).

    The native kernels (CPU and CUDA, same algorithm) fuse, per sample: ``G = J^T J`` and ``b = J^T r``
    accumulated in float64; a ridge ``delta = 1e-10 * trace(G) / d + 1e-290``; the Cholesky factor of
    ``G + delta I``; ``a = (G + delta I)^-1 b`` refined twice by ``a += (G + delta I)^-1 (b - G a)``;
    ``p = r - J a`` in float64; ``v = p / |p|``. Rank-deficient or ill-conditioned J therefore give finite
    results: directions of J whose squared singular values exceed ~1e-8 * trace(G)/d (condition numbers up to
    ~1e4) are projected out to float64 accuracy, directions with squared singular values far below the ridge
    are treated as absent (not projected out), the few in between partially. J == 0 gives ``r / |r|``. If
    ``P r`` is exactly zero the result is a zero vector (never NaN). Samples whose Gram matrix would leave the
    float64 range (|J| or |r| beyond ~1e+-100, float64 inputs only) are rescaled by powers of two first. NaN or
    Inf in a sample's ``jac`` or ``r`` gives a NaN row. The pure-PyTorch reference (``backend()=="reference"``)
    uses a reduced QR of J instead (no ridge) and also returns NaN rows for NaN/Inf input.

    Differentiable in ``jac`` and ``r`` (twice, too) by :func:`nullspace_project_vjp`: with ``p = P r``,
    ``g = dL/dv`` and ``u = P (g - v (v . g)) / |p|``, ``dL/dr = u`` and ``dL/dJ = -u a^T - p b^T`` where
    ``a = J^+ r``, ``b = J^+ (g - v (v . g)) / |p|``. Rows with ``P r = 0`` get zero gradients.
    """
    check_tensor("jac", jac, dims=3, dtypes=(torch.float32, torch.float64))
    check_tensor("r", r, dims=2, dtypes=(torch.float32, torch.float64))
    b, d_out, d_lat = jac.shape
    if r.shape != (b, d_out):
        raise ValueError(f"r must have shape [B, D] = [{b}, {d_out}] to match jac, got {tuple(r.shape)}")
    if d_out <= d_lat:
        raise ValueError(f"jac must have D > d (more outputs than latents) for a null space to exist, got D={d_out}, d={d_lat}")
    if d_lat > MAX_LATENT or d_lat < 1:
        raise ValueError(f"jac's latent size d must be in [1, {MAX_LATENT}], got {d_lat}")
    if jac.dtype != r.dtype:
        raise TypeError(f"jac and r must have the same dtype, got {jac.dtype} and {r.dtype}")
    check_same_device(jac=jac, r=r)
    if use_native(jac):
        return torch.ops.fastood.nullspace_project(jac, r)
    return reference.nullspace_project(jac, r)


def nullspace_project_vjp(jac: torch.Tensor, r: torch.Tensor, grad_v: torch.Tensor):
    """``(dL/djac [B, D, d], dL/dr [B, D])`` of ``v = P r / |P r|`` given ``grad_v = dL/dv`` [B, D].

    Derivation: ``dv = (I - v v^T) dp / |p|`` with ``p = P r``, so ``dL/dp = w = (I - v v^T) g / |p|``. From
    ``dp = P dr + dP r`` and, for J of full column rank, ``dP = -(P dJ J^+ + (J^+)^T dJ^T P)``:
    ``dL/dr = P w`` and ``dL/dJ = -(P w) a^T - p b^T`` with ``a = J^+ r``, ``b = J^+ w``,
    ``J^+ = (J^T J)^-1 J^T``. Computed in float64 with the native kernels' ridge
    ``delta = 1e-10 trace(J^T J) / d`` on J and r divided by per-sample powers of two (exact; v is
    scale-invariant), and written in differentiable torch ops, so double backward works. Rows where P r = 0
    (v = 0, no gradient defined) get zero gradients; rows with NaN/Inf input (or, never seen, a Gram matrix the
    ridge leaves indefinite) get NaN gradients.
    """
    jd, rd, gd = jac.double(), r.double(), grad_v.double()
    bad = ~(torch.isfinite(jd).flatten(1).all(1) & torch.isfinite(rd).all(1))
    jd = torch.where(bad[:, None, None], torch.zeros_like(jd), jd)
    rd = torch.where(bad[:, None], torch.zeros_like(rd), rd)
    scale_j, scale_r = pow2_scale(jd, (1, 2)), pow2_scale(rd, 1)
    jn, rn = jd / scale_j, rd / scale_r
    jt = jn.transpose(1, 2)
    gram = jt @ jn
    d = gram.shape[-1]
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1) / d + 1e-290
    # cholesky_ex: a factorization the ridge cannot rescue gives that sample NaN gradients, not an exception
    chol, info = torch.linalg.cholesky_ex(gram + ridge[:, None, None] * torch.eye(d, dtype=gram.dtype,
                                                                                  device=gram.device))
    bad = bad | (info != 0)

    def pinv(y):   # J^+ y [B, d] for y [B, D], refined once (as the kernels do) against the ridge's bias
        coef = torch.cholesky_solve((jt @ y.unsqueeze(2)), chol)
        coef = coef + torch.cholesky_solve(jt @ (y.unsqueeze(2) - jn @ coef), chol)
        return coef.squeeze(2)

    a = pinv(rn)
    p = rn - (jn @ a.unsqueeze(2)).squeeze(2)
    norm = p.norm(dim=1, keepdim=True)
    alive = norm > 0
    safe = torch.where(alive, norm, torch.ones_like(norm))
    v = p / safe
    w = torch.where(alive, (gd - v * (v * gd).sum(1, keepdim=True)) / safe, torch.zeros_like(gd))
    b = pinv(w)
    grad_r = w - (jn @ b.unsqueeze(2)).squeeze(2)                          # P w
    grad_j = -(grad_r.unsqueeze(2) * a.unsqueeze(1) + p.unsqueeze(2) * b.unsqueeze(1))
    grad_r = (grad_r / scale_r).masked_fill(bad[:, None], float("nan"))
    grad_j = (grad_j / scale_j).masked_fill(bad[:, None, None], float("nan"))
    return grad_j.to(jac.dtype), grad_r.to(r.dtype)


if native_available():
    @torch.library.register_fake("fastood::nullspace_project")
    def _fake_project(jac, r):
        return torch.empty_like(r, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        jac, r = inputs
        ctx.save_for_backward(jac, r)

    def _backward(ctx, grad_v):
        jac, r = ctx.saved_tensors
        grad_j, grad_r = nullspace_project_vjp(jac, r, grad_v)
        return (grad_j if ctx.needs_input_grad[0] else None), (grad_r if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd("fastood::nullspace_project", _backward, setup_context=_setup_context)
