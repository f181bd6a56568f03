"""Batched projection onto the left null space of a Jacobian (Vernekar et al., type-I outliers)."""
import torch

from . import reference
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


if native_available():
    @torch.library.register_fake("fastood::nullspace_project")
    def _fake_project(jac, r):
        return torch.empty_like(r, memory_format=torch.contiguous_format)
