"""Batched projection onto the left null space of a Jacobian (Vernekar et al., type-I outliers)."""
import torch

from . import reference
from ._backend import native_available, use_native
from ._checks import check_same_device, check_tensor

MAX_LATENT = 64


def nullspace_project(jac: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``v = P r / |P r|``, ``P = I - J (J^T J)^-1 J^T``, one per sample.

    Args:
        jac: [B, D, d] decoder Jacobians dg/dz (float32/float64), d <= 64 and D > d.
        r:   [B, D] directions (typically N(0, I_D)).
    Returns:
        [B, D] unit vectors orthogonal to the columns of J, dtype of ``r``.

    The native kernel forms the Gram matrix ``G = J^T J`` in float64, adds a ridge
    ``1e-10 * trace(G) / d`` (plus a tiny absolute floor) before the Cholesky solve, so rank-deficient or
    ill-conditioned J give finite results: directions of J with singular values far below the ridge are
    treated as absent (not projected out). If ``P r`` is exactly zero the result is a zero vector.
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
