"""Pure-PyTorch reference of every fastood op: the ground truth the native kernels are tested against.

All functions accept the same arguments as their counterparts in :mod:`fastood.ops` and compute in
float32 (or float64 for float64 inputs); outputs have the input's dtype.
"""
import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def modified_energy(logits: torch.Tensor, c: float = 5.0) -> torch.Tensor:
    """FIG modified energy per row: ``E = sum_y (f_y/c) (1 - exp(f_y/c))``. logits [B, C] -> [B]."""
    s = _acc(logits) / c
    return (s * (1.0 - torch.exp(s))).sum(dim=1).to(logits.dtype)


def modified_energy_grad(logits: torch.Tensor, c: float = 5.0):
    """``(E [B], dE/df [B, C])`` with ``dE/df_y = (1/c) (1 - (1 + f_y/c) exp(f_y/c))``."""
    s = _acc(logits) / c
    e = torch.exp(s)
    energy = (s * (1.0 - e)).sum(dim=1)
    grad = (1.0 - (1.0 + s) * e) / c
    return energy.to(logits.dtype), grad.to(logits.dtype)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax per row, ``H = -sum_k p_k log p_k``; stable for large logits. [B, C] -> [B]."""
    logp = torch.log_softmax(_acc(logits), dim=1)
    return -(logp.exp() * logp).sum(dim=1).to(logits.dtype)


def softmax_entropy_backward(grad_entropy: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``dH/df_j = -p_j (log p_j + H)``, times the incoming gradient [B]."""
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
    new = xa - 0.5 * step_size * torch.sign(_acc(grad))
    if noise_std != 0.0:
        new = new + noise_std * torch.randn_like(xa)
    new = torch.minimum(torch.maximum(new, _bound(lower, x)), _bound(upper, x))
    if active is not None:
        mask = active.reshape((-1,) + (1,) * (x.dim() - 1))
        new = torch.where(mask, new, xa)
    x.copy_(new)
    return x


def nullspace_project(jac: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``P r / |P r|`` with P the projector onto the left null space of J, via reduced QR.

    jac [B, D, d], r [B, D] -> [B, D]. A zero projection (r inside the range of J) gives a zero vector;
    NaN or Inf anywhere in a sample's ``jac`` or ``r`` gives a NaN row (as the native kernels do).
    """
    ja, ra = _acc(jac), _acc(r)
    bad = ~(torch.isfinite(ja).flatten(1).all(1) & torch.isfinite(ra).all(1))
    ja = torch.where(bad[:, None, None], torch.zeros_like(ja), ja)
    ra = torch.where(bad[:, None], torch.zeros_like(ra), ra)
    q, _ = torch.linalg.qr(ja, mode="reduced")
    p = ra - (q @ (q.transpose(1, 2) @ ra.unsqueeze(2))).squeeze(2)
    norm = p.norm(dim=1, keepdim=True)
    out = torch.where(norm > 0, p / norm.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    return out.masked_fill(bad[:, None], float("nan")).to(r.dtype)
