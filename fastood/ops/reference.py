"""Pure-PyTorch reference of every fastood op: the ground truth the native kernels are tested against.

All functions accept the same arguments as their counterparts in :mod:`fastood.ops` and compute in
float32 (or float64 for float64 inputs); outputs have the input's dtype.
"""
import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _energy_terms(s: torch.Tensor) -> torch.Tensor:
    """``s (1 - exp(s))`` as ``-s expm1(s)``: 1 - exp(s) loses all but ~|s| / eps of its digits for small |s|
    (relative error 1.4e-3 at s = 1e-5 in float32); expm1 keeps them."""
    return -s * torch.expm1(s)


def _energy_slope(s: torch.Tensor, c: float) -> torch.Tensor:
    """``dE/df = (1/c) (1 - (1 + s) exp(s)) = (1/c) (-expm1(s) - s exp(s))`` (no cancellation for small |s|)."""
    return (-torch.expm1(s) - s * torch.exp(s)) / c


def modified_energy(logits: torch.Tensor, c: float = 5.0) -> torch.Tensor:
    """FIG modified energy per row: ``E = sum_y (f_y/c) (1 - exp(f_y/c))``. logits [B, C] -> [B]."""
    s = _acc(logits) / c
    return _energy_terms(s).sum(dim=1).to(logits.dtype)


def modified_energy_grad(logits: torch.Tensor, c: float = 5.0):
    """``(E [B], dE/df [B, C])`` with ``dE/df_y = (1/c) (1 - (1 + f_y/c) exp(f_y/c))``."""
    s = _acc(logits) / c
    return _energy_terms(s).sum(dim=1).to(logits.dtype), _energy_slope(s, c).to(logits.dtype)


def modified_energy_backward(grad_energy: torch.Tensor, logits: torch.Tensor, c: float = 5.0) -> torch.Tensor:
    """``grad_energy[b] * dE/df[b, :]`` [B, C]; written in differentiable torch ops (double backward)."""
    s = _acc(logits) / c
    return (_acc(grad_energy).unsqueeze(1) * _energy_slope(s, c)).to(logits.dtype)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax per row, ``H = -sum_k p_k log p_k``; stable for large logits. [B, C] -> [B]."""
    logp = torch.log_softmax(_acc(logits), dim=1)
    return -(logp.exp() * logp).sum(dim=1).to(logits.dtype)


def softmax_entropy_backward(grad_entropy: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``dH/df_j = -p_j (log p_j + H)``, times the incoming gradient [B]; differentiable (double backward)."""
    logp = torch.log_softmax(_acc(logits), dim=1)
    p = logp.exp()
    h = -(p * logp).sum(dim=1, keepdim=True)
    return (-p * (logp + h) * _acc(grad_entropy).unsqueeze(1)).to(logits.dtype)


def _bound(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel bound, shaped to broadcast against x [B, C, ...]."""
    b = torch.as_tensor(value, device=x.device, dtype=_acc(x).dtype)
    if b.numel() > 1:
        b = b.reshape((1, -1) + (1,) * (x.dim() - 2))
    return b


def langevin_step_(x, grad, step_size, noise_std, lower, upper, active=None):
    """In place: ``x <- clamp(x - step/2 sign(grad) + noise_std N(0, 1), lower, upper)`` where ``active``.

    x, grad [B, ...]; lower/upper scalars or per-channel [C]; active bool [B] or None. Returns x.
    """
    xa = _acc(x)
    # sign(grad) in x's compute dtype: 0.5 * step_size times a float32 sign would round the step to float32
    new = xa - 0.5 * step_size * torch.sign(grad).to(xa.dtype)
    if noise_std != 0.0:
        new = new + noise_std * torch.randn_like(xa)
    new = torch.minimum(torch.maximum(new, _bound(lower, x)), _bound(upper, x))
    if active is not None:
        mask = active.reshape((-1,) + (1,) * (x.dim() - 1))
        new = torch.where(mask, new, xa)
    x.copy_(new)
    return x


def pow2_scale(t: torch.Tensor, dims) -> torch.Tensor:
    """Per-sample float64 power of two ``2^k <= max|t| < 2^(k+1)`` over ``dims`` (1 where t is all zero or not
    finite), kept as dims of size 1. Dividing by it is exact and brings the largest entry into [1, 2)."""
    with torch.no_grad():
        m = t.detach().double().abs().amax(dim=dims, keepdim=True)
        _, e = torch.frexp(m)   # m = mantissa * 2^e, mantissa in [0.5, 1); 2^(e-1) never overflows float64
        scale = torch.ldexp(torch.ones_like(m), e - 1)
        return torch.where((m > 0) & torch.isfinite(m), scale, torch.ones_like(m))


def nullspace_project(jac: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``P r / |P r|`` with P the projector onto the left null space of J, via reduced QR.

    jac [B, D, d], r [B, D] -> [B, D]. A zero projection (r inside the range of J) gives a zero vector;
    NaN or Inf anywhere in a sample's ``jac`` or ``r`` gives a NaN row (as the native kernels do). J and r are
    first divided by per-sample powers of two (exact; ``v`` does not depend on their scale), so |P r| neither
    underflows nor overflows for tiny or huge inputs (float32 |r| ~ 1e-19 or 1e30 squared would).
    Differentiable by autograd (through the QR; J must have full column rank).
    """
    ja, ra = _acc(jac), _acc(r)
    bad = ~(torch.isfinite(ja).flatten(1).all(1) & torch.isfinite(ra).all(1))
    ja = torch.where(bad[:, None, None], torch.zeros_like(ja), ja)
    ra = torch.where(bad[:, None], torch.zeros_like(ra), ra)
    ja = (ja.double() / pow2_scale(ja, (1, 2))).to(ja.dtype)   # exact: only the exponents change
    ra = (ra.double() / pow2_scale(ra, 1)).to(ra.dtype)
    q, _ = torch.linalg.qr(ja, mode="reduced")
    p = ra - (q @ (q.transpose(1, 2) @ ra.unsqueeze(2))).squeeze(2)
    norm = p.norm(dim=1, keepdim=True)
    out = torch.where(norm > 0, p / norm.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    return out.masked_fill(bad[:, None], float("nan")).to(r.dtype)
