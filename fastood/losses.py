"""Training losses of every fastood method, as plain functions on tensors.

Each ``*_loss`` returns a scalar to minimize; its ``*_loss_terms`` twin returns the same value under ``"loss"``
together with the terms it is made of (what the trainers log). :func:`fig_loss` and :func:`cmg_energy_loss` return
``(loss, ce, term)`` tuples instead (as they always did). The objectives of :mod:`fastood.objectives` (one
training step of each method, which the trainers loop over) are built on these.

Logits are ``[B, C]`` with classes on dim 1; every softmax, entropy and log-sum-exp here runs over the class axis,
never over the batch. Computations run in float32 (or float64 for float64 inputs), so bfloat16 logits from
autocast are fine.

An empty outlier / unlabeled batch contributes a zero term (still attached to the graph); an empty labeled batch
is an error (its cross-entropy is undefined).

- :func:`oe_loss`: Outlier Exposure (Hendrycks et al., ICLR 2019, Eq. 1 with the cross-entropy to the uniform
  distribution).
- :func:`energy`, :func:`energy_margin_loss`, :func:`energy_oe_loss`: the free energy and the energy-bounded
  learning objective (Liu et al., NeurIPS 2020, Sec. "energy-bounded learning"); CMG-energy reuses
  :func:`energy_margin_loss`.
- :func:`discrepancy_loss`: two-head entropy discrepancy (Yu & Aizawa, ICCV 2019; the unlabeled term of their
  fine-tuning loss, Eq. 3).
- :func:`ice_loss`: ICE (Wu et al., AAAI 2023): cross-entropy over the Gaussian head plus the in-distribution
  likelihood and the outliers' ``-log(1 - exp(max_i h_i))``, computed stably.
- :func:`fig_loss`: FIG (Zhao, Cao, Lin, TNNLS, Algorithm 2): cross-entropy minus the mean softmax entropy of the
  generated batch.
- :func:`extra_class_loss`: the (n+1)-class cross-entropy with the outliers labeled n (Vernekar et al. 2019, with
  the outlier class weighted; CMG-softmax, weight 1).
- :func:`cmg_energy_loss`: CMG-energy (Wang et al., ECML 2022): cross-entropy plus :func:`energy_margin_loss`.
"""
import math

import torch
import torch.nn.functional as F

from fastood import ops

_LOG_HALF = -math.log(2.0)


# ------------------------------------------------------------------------------------------------ input checks
def _check_scores(name: str, t, allow_empty: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, C] (classes on dim 1), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(t.shape)}")
    if not allow_empty and t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); a labeled batch needs >= 1 row")
    return t.double() if t.dtype == torch.float64 else t.float()


def _check_labels(y, batch: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices [B], got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"y must have shape [{batch}] (one label per row of the logits), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    return y.long()


def _check_id_and_outliers(names, scores_in, y, scores_out):
    """Checks the (ID scores [B, C] with B >= 1, labels [B], outlier scores [M, C]) triple of an outlier loss;
    ``names`` = (name of the ID scores, name of the outlier scores). Returns the three, validated."""
    name_in, name_out = names
    scores_in = _check_scores(name_in, scores_in, allow_empty=False)
    y = _check_labels(y, scores_in.shape[0])
    scores_out = _check_scores(name_out, scores_out)
    if scores_in.shape[1] != scores_out.shape[1]:
        raise ValueError(f"{name_in} and {name_out} must have the same number of classes, "
                         f"got {scores_in.shape[1]} and {scores_out.shape[1]}")
    return scores_in, y, scores_out


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _zero_like_graph(*tensors) -> torch.Tensor:
    """A scalar 0 that depends on ``tensors`` (so ``backward`` still reaches them, with zero gradient)."""
    return sum(t.sum() for t in tensors) * 0.0


# ------------------------------------------------------------------------------------------------ OE
def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy from the uniform distribution to ``softmax(logits)``: ``-1/C sum_k log p_k`` [B].

    Equals ``logsumexp_k f_k - mean_k f_k``; minimal (``log C``) when all logits are equal.
    """
    logits = _check_scores("logits", logits)
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def oe_loss_terms(logits_in, y, logits_out, lam: float = 0.5) -> dict:
    """Terms of :func:`oe_loss`: ``{"loss", "ce", "outlier"}`` (``outlier`` = mean uniform cross-entropy)."""
    lam = _check_weight("lam", lam)
    logits_in, y, logits_out = _check_id_and_outliers(("logits_in", "logits_out"), logits_in, y, logits_out)
    ce = F.cross_entropy(logits_in, y)
    outlier = uniform_cross_entropy(logits_out).mean() if logits_out.shape[0] else _zero_like_graph(logits_out)
    return {"loss": ce + lam * outlier, "ce": ce, "outlier": outlier}


def oe_loss(logits_in, y, logits_out, lam: float = 0.5) -> torch.Tensor:
    """Outlier Exposure (Hendrycks, Mazeika, Dietterich, ICLR 2019, Eq. 1 for classification):
    ``CE(f(x_in), y) + lam * mean_{x_out} [ -1/C sum_k log softmax(f(x_out))_k ]``, lam = 0.5.

    Args: logits_in [B, C] (B >= 1), y [B] class indices, logits_out [M, C] (M may be 0). Returns a scalar.
    """
    return oe_loss_terms(logits_in, y, logits_out, lam)["loss"]


# ------------------------------------------------------------------------------------------------ energy
def energy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Free energy ``E(x) = -T logsumexp_k(f_k / T)`` [B] (Liu et al., NeurIPS 2020).

    Higher energy = more OOD (the :class:`fastood.detectors.Energy` score). Differentiable.
    """
    T = _check_finite_number("T", T)
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    logits = _check_scores("logits", logits)
    return -T * torch.logsumexp(logits / T, dim=1)


def energy_margin_loss(energy_in, energy_out, m_in: float, m_out: float) -> torch.Tensor:
    """Squared-hinge energy regularizer (Liu et al. 2020; CMG-energy reuses it):
    ``mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2``.

    Pushes ID energies below ``m_in`` and outlier energies above ``m_out``. ``energy_in`` [B], ``energy_out`` [M]
    (either may be empty: its term is then 0). Returns a scalar.
    """
    m_in, m_out = _check_finite_number("m_in", m_in), _check_finite_number("m_out", m_out)
    for name, t in (("energy_in", energy_in), ("energy_out", energy_out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D floating-point tensor of energies [B], got {got}")
    term_in = F.relu(energy_in - m_in).pow(2).mean() if energy_in.numel() else _zero_like_graph(energy_in)
    term_out = F.relu(m_out - energy_out).pow(2).mean() if energy_out.numel() else _zero_like_graph(energy_out)
    return term_in + term_out


def energy_oe_loss_terms(logits_in, y, logits_out, m_in: float = -25.0, m_out: float = -7.0, lam: float = 0.1,
                         T: float = 1.0) -> dict:
    """Terms of :func:`energy_oe_loss`: ``{"loss", "ce", "margin", "energy_in", "energy_out"}`` (the last two
    are the mean energies, detached, for logging)."""
    lam = _check_weight("lam", lam)
    logits_in, y, logits_out = _check_id_and_outliers(("logits_in", "logits_out"), logits_in, y, logits_out)
    ce = F.cross_entropy(logits_in, y)
    e_in, e_out = energy(logits_in, T), energy(logits_out, T)
    margin = energy_margin_loss(e_in, e_out, m_in, m_out)
    mean_out = e_out.detach().mean() if e_out.numel() else e_out.new_tensor(float("nan"))
    return {"loss": ce + lam * margin, "ce": ce, "margin": margin, "energy_in": e_in.detach().mean(),
            "energy_out": mean_out}


def energy_oe_loss(logits_in, y, logits_out, m_in: float = -25.0, m_out: float = -7.0, lam: float = 0.1,
                   T: float = 1.0) -> torch.Tensor:
    """Energy-bounded outlier exposure (Liu et al., NeurIPS 2020, the energy-bounded learning objective):
    ``CE(f(x_in), y) + lam * (mean relu(E(x_in) - m_in)^2 + mean relu(m_out - E(x_out))^2)``,
    ``E = -T logsumexp(f / T)``; defaults lam = 0.1, m_in = -25, m_out = -7, T = 1 (the paper's CIFAR values).

    Args: logits_in [B, C] (B >= 1), y [B], logits_out [M, C] (M may be 0). Returns a scalar.
    """
    return energy_oe_loss_terms(logits_in, y, logits_out, m_in, m_out, lam, T)["loss"]


# ------------------------------------------------------------------------------------------------ two heads
def discrepancy_loss_terms(logits1, logits2, margin: float = 1.2) -> dict:
    """Terms of :func:`discrepancy_loss`: ``{"loss", "entropy_gap"}`` with ``entropy_gap = mean H(p1) - H(p2)``
    (0 for an empty batch)."""
    margin = _check_finite_number("margin", margin)
    logits1 = _check_scores("logits1", logits1)
    logits2 = _check_scores("logits2", logits2)
    if logits1.shape != logits2.shape:
        raise ValueError(f"logits1 and logits2 must have the same shape [U, C], got {tuple(logits1.shape)} and "
                         f"{tuple(logits2.shape)}")
    if logits1.shape[0] == 0:
        gap = _zero_like_graph(logits1, logits2)
        return {"loss": gap, "entropy_gap": gap}
    # ops.softmax_entropy normalizes each row, i.e. over the class axis (dim 1), whatever the batch size.
    gap = (ops.softmax_entropy(logits1) - ops.softmax_entropy(logits2)).mean()
    return {"loss": F.relu(margin - gap), "entropy_gap": gap}


def discrepancy_loss(logits1, logits2, margin: float = 1.2) -> torch.Tensor:
    """Unlabeled loss of the two-head discrepancy method (Yu & Aizawa, ICCV 2019, Eq. 5, with the discrepancy
    ``d(p1, p2) = H(p1) - H(p2)`` of Eq. 1): ``max(m - mean_x [H(p1(x)) - H(p2(x))], 0)``,
    ``p_j = softmax(f_j(x))`` over the classes (dim 1), m = 1.2. Step B of the paper minimizes the supervised loss
    plus this term (Eq. 3).

    Minimizing it makes head 1 uncertain and head 2 confident on the unlabeled images, until their mean entropy
    gap reaches the margin; on ID images (where both heads are also trained with cross-entropy) the heads keep
    agreeing, so their disagreement ``sum_k |p1_k - p2_k|`` flags OOD inputs.

    Args: logits1, logits2 [U, C] (U may be 0: the loss is then 0). Returns a scalar.
    """
    return discrepancy_loss_terms(logits1, logits2, margin)["loss"]


# ------------------------------------------------------------------------------------------------ ICE
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012): ``log(-expm1(x))`` for
    ``x > -log 2``, ``log1p(-exp(x))`` below. Both branches are finite for every ``x < 0``."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def ice_outlier_nll(h_out: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-log(1 - exp(max_i h_i(z_out)))`` [M]: the negative log-probability that an outlier is *not*
    in-distribution under ICE's likelihood ``exp(max_i h_i)``.

    ``max_i h_i`` is clamped to at most ``-eps`` first, so an outlier sitting on a class mean (h = 0) costs
    ``-log(eps)`` (about 13.8 for eps = 1e-6) instead of ``inf``, and the gradient stays finite (at most ~1/eps);
    inside the clamp the gradient is zero (there ``grad_z h`` vanishes anyway, since ``z = m_i`` is h's maximum).
    """
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    h_out = _check_scores("h_out", h_out)
    best = h_out.max(dim=1).values.clamp(max=-float(eps))
    return -log1mexp(best)


def ice_loss_terms(h_in, y, h_out, lam: float = 1.0, eps: float = 1e-6) -> dict:
    """Terms of :func:`ice_loss`: ``{"loss", "ce", "id_nll", "outlier_nll"}`` with ``id_nll = mean -h_y(z)`` and
    ``outlier_nll = mean -log(1 - exp(max_i h_i(z_out)))``."""
    lam = _check_weight("lam", lam)
    h_in, y, h_out = _check_id_and_outliers(("h_in", "h_out"), h_in, y, h_out)
    ce = F.cross_entropy(h_in, y)
    id_nll = -h_in.gather(1, y.unsqueeze(1)).mean()
    outlier_nll = ice_outlier_nll(h_out, eps).mean() if h_out.shape[0] else _zero_like_graph(h_out)
    return {"loss": ce + lam * (id_nll + outlier_nll), "ce": ce, "id_nll": id_nll, "outlier_nll": outlier_nll}


def ice_loss(h_in, y, h_out, lam: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """ICE (Wu et al., "Towards in-distribution compatibility in OOD detection", AAAI 2023):
    ``CE(softmax(h(z_in)), y) + lam * (mean -h_y(z_in) + mean -log(1 - exp(max_i h_i(z_out))))``, lam = 1,
    where ``h_i(z) = -||L^-1 (z - m_i)||^2 <= 0`` are the Gaussian head's values
    (:class:`fastood.models.GaussianHead`) and ``exp(max_i h_i)`` is the in-distribution probability.

    The outlier term is computed stably (:func:`ice_outlier_nll`): finite value and gradient even at h = 0.

    Args: h_in [B, C] (B >= 1), y [B], h_out [M, C] (M may be 0), eps: clamp of ``max_i h_i`` below 0.
    Returns a scalar.
    """
    return ice_loss_terms(h_in, y, h_out, lam, eps)["loss"]


# ------------------------------------------------------------------------------------------------ FIG
def fig_loss(logits_id, labels, logits_gen, lam=1.0):
    """FIG's fine-tuning objective (Zhao, Cao, Lin, TNNLS, Algorithm 2)
    ``CE(f(x_id), y) - lam * mean_i H(softmax(f(x_gen_i)))``.

    Args:
        logits_id: [b, C] logits of the ID batch (b >= 1); labels: [b] class indices.
        logits_gen: [g, C] logits of the generated batch (g may be 0: the entropy term is then 0).
        lam: weight of the entropy term (paper: 1), >= 0.
    Returns ``(loss, ce, mean_entropy)``, scalars; ``loss`` is differentiable in both logits.
    """
    lam = _check_weight("lam", lam)
    logits_id, labels, logits_gen = _check_id_and_outliers(("logits_id", "logits_gen"), logits_id, labels,
                                                            logits_gen)
    ce = F.cross_entropy(logits_id, labels)
    entropy = ops.softmax_entropy(logits_gen).mean() if logits_gen.shape[0] else logits_id.new_zeros(())
    return ce - lam * entropy, ce, entropy


# ------------------------------------------------------------------------------------------------ n+1 classes
def extra_class_loss(logits_in, y, logits_out, ood_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of an (n+1)-class classifier whose last class is "outlier", over the joint batch: the ID
    images with their labels, the outliers labeled n, weighted (torch's weighted mean)::

        sum_i w_{t_i} CE(f(x_i), t_i) / sum_i w_{t_i},   w = 1 for the n ID classes, ood_weight for class n

    The n+1 classifier of Vernekar et al. 2019 (ood_weight 0.1) and CMG-softmax (Wang et al. 2022, weight 1).

    Args: logits_in [B, n+1] (B >= 1), y [B] in [0, n-1], logits_out [M, n+1] (M may be 0), ood_weight > 0.
    Returns a scalar.
    """
    ood_weight = _check_weight("ood_weight", ood_weight)
    if ood_weight == 0:
        raise ValueError("ood_weight must be > 0, got 0")
    logits_in, y, logits_out = _check_id_and_outliers(("logits_in", "logits_out"), logits_in, y, logits_out)
    n_out = logits_in.shape[1]
    if n_out < 2:
        raise ValueError(f"the logits must have n + 1 >= 2 columns (the last is the outlier class), got {n_out}")
    if int(y.max()) >= n_out - 1 or int(y.min()) < 0:
        raise ValueError(f"labels must lie in [0, {n_out - 2}]: the logits have {n_out} columns = n ID classes + "
                         f"the outlier class; got labels in [{int(y.min())}, {int(y.max())}]")
    logits = torch.cat([logits_in, logits_out])
    targets = torch.cat([y, y.new_full((logits_out.shape[0],), n_out - 1)])
    weight = logits.new_ones(n_out)
    weight[-1] = ood_weight
    return F.cross_entropy(logits, targets, weight=weight)


# ------------------------------------------------------------------------------------------------ CMG
def cmg_energy_loss(logits_id, labels, logits_ood, m_in, m_out, lam=0.1, T=1.0):
    """CMG-energy's objective (Wang et al., ECML 2022, as Liu et al.'s energy fine-tuning)::

        CE(f(x_id), y) + lam * ( mean relu(E(x_id) - m_in)^2 + mean relu(m_out - E(x_ood))^2 )

    with ``E = -T logsumexp(f / T)`` (:func:`energy`, regularizer :func:`energy_margin_loss`). logits_id [b, n]
    (b >= 1), labels [b], logits_ood [g, n] (g may be 0). Returns ``(loss, ce, regularizer)`` scalars.
    """
    lam = _check_weight("lam", lam)
    logits_id, labels, logits_ood = _check_id_and_outliers(("logits_id", "logits_ood"), logits_id, labels,
                                                           logits_ood)
    ce = F.cross_entropy(logits_id, labels)
    reg = energy_margin_loss(energy(logits_id, T), energy(logits_ood, T), m_in, m_out)
    return ce + lam * reg, ce, reg


__all__ = [
    "uniform_cross_entropy", "oe_loss", "oe_loss_terms", "energy", "energy_margin_loss", "energy_oe_loss",
    "energy_oe_loss_terms", "discrepancy_loss", "discrepancy_loss_terms", "log1mexp", "ice_outlier_nll", "ice_loss",
    "ice_loss_terms", "fig_loss", "extra_class_loss", "cmg_energy_loss",
]
