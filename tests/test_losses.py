import math

import pytest
import torch
import torch.nn.functional as F

from fastood.losses import (discrepancy_loss, discrepancy_loss_terms, energy, energy_margin_loss, energy_oe_loss,
                            energy_oe_loss_terms, ice_loss, ice_loss_terms, ice_outlier_nll, log1mexp, oe_loss,
                            uniform_cross_entropy)
from fastood.models import GaussianHead


def _row_entropy(row):
    """H(softmax(row)) by hand, one row of plain floats."""
    z = [math.exp(v) for v in row]
    s = sum(z)
    return -sum((e / s) * math.log(e / s) for e in z)


# ------------------------------------------------------------------------------------------------ OE
def test_oe_loss_matches_hand_computation():
    logits_in = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 1])
    logits_out = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    ce = sum(-math.log(math.exp(r[t]) / sum(math.exp(v) for v in r)) for r, t in ((logits_in[0].tolist(), 0),
                                                                                 (logits_in[1].tolist(), 1))) / 2
    # CE to uniform: -1/C sum_k log p_k, per outlier, then the mean
    u = []
    for r in logits_out.tolist():
        lse = math.log(sum(math.exp(v) for v in r))
        u.append(-sum(v - lse for v in r) / 3)
    expected = ce + 0.5 * sum(u) / 2
    assert oe_loss(logits_in, y, logits_out) == pytest.approx(expected, rel=1e-6)
    assert u[1] == pytest.approx(math.log(3))  # equal logits: the minimum, log C
    torch.testing.assert_close(uniform_cross_entropy(logits_out), torch.tensor(u))


def test_oe_loss_empty_outliers_is_plain_ce():
    logits_in = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = oe_loss(logits_in, y, torch.zeros(0, 3))
    torch.testing.assert_close(loss, F.cross_entropy(logits_in, y))
    loss.backward()
    assert torch.isfinite(logits_in.grad).all()


# ------------------------------------------------------------------------------------------------ energy
def test_energy_and_energy_oe_loss_match_hand_computation():
    logits_in = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    y = torch.tensor([0, 1])
    logits_out = torch.tensor([[0.1, -0.2], [5.0, 5.0]])
    e = lambda r, T=1.0: -T * math.log(sum(math.exp(v / T) for v in r))  # noqa: E731
    e_in = [e(r) for r in logits_in.tolist()]
    e_out = [e(r) for r in logits_out.tolist()]
    torch.testing.assert_close(energy(logits_in), torch.tensor(e_in))
    torch.testing.assert_close(energy(logits_in, T=2.0), torch.tensor([e(r, 2.0) for r in logits_in.tolist()]))
    m_in, m_out = -3.5, -1.0
    margin = (sum(max(v - m_in, 0) ** 2 for v in e_in) / 2 + sum(max(m_out - v, 0) ** 2 for v in e_out) / 2)
    ce = F.cross_entropy(logits_in, y).item()
    assert energy_margin_loss(energy(logits_in), energy(logits_out), m_in, m_out) == pytest.approx(margin, rel=1e-6)
    got = energy_oe_loss(logits_in, y, logits_out, m_in=m_in, m_out=m_out, lam=0.1)
    assert got == pytest.approx(ce + 0.1 * margin, rel=1e-6)
    # Defaults are the paper's -25 / -7 / 0.1
    terms = energy_oe_loss_terms(logits_in, y, logits_out)
    default_margin = (sum(max(v + 25, 0) ** 2 for v in e_in) / 2 + sum(max(-7 - v, 0) ** 2 for v in e_out) / 2)
    assert terms["margin"] == pytest.approx(default_margin, rel=1e-6)
    assert terms["loss"] == pytest.approx(ce + 0.1 * default_margin, rel=1e-6)


def test_energy_margin_pushes_energies_the_right_way():
    e_in = torch.tensor([0.0, -10.0], requires_grad=True)
    e_out = torch.tensor([-20.0, 0.0], requires_grad=True)
    energy_margin_loss(e_in, e_out, m_in=-5.0, m_out=-5.0).backward()
    assert e_in.grad[0] > 0 and e_in.grad[1] == 0      # ID above m_in: descent lowers it
    assert e_out.grad[0] < 0 and e_out.grad[1] == 0    # outlier below m_out: descent raises it


# ------------------------------------------------------------------------------------------------ discrepancy
def test_discrepancy_entropy_is_over_classes_not_batch():
    # Rows and columns of these logits have different softmax entropies, so a softmax over the batch axis
    # (dim 0) would give another value.
    l1 = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, -1.0]])
    l2 = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    gap = sum(_row_entropy(a) - _row_entropy(b) for a, b in zip(l1.tolist(), l2.tolist())) / 2
    wrong = sum(_row_entropy(a) - _row_entropy(b) for a, b in zip(l1.T.tolist(), l2.T.tolist())) / 3
    assert abs(gap - wrong) > 0.05
    terms = discrepancy_loss_terms(l1, l2, margin=1.2)
    assert terms["entropy_gap"] == pytest.approx(gap, rel=1e-6)
    assert terms["loss"] == pytest.approx(max(1.2 - gap, 0.0), rel=1e-6)
    assert discrepancy_loss(l1, l2, margin=-5.0) == 0.0  # hinge: inactive once the gap exceeds the margin


def test_discrepancy_batch_of_one():
    # With a softmax over the batch axis every entropy of a single row would be 0; over classes it is not.
    l1 = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    l2 = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    gap = _row_entropy(l1[0].tolist()) - _row_entropy(l2[0].tolist())
    assert gap > 0.5
    assert discrepancy_loss(l1, l2, margin=1.2) == pytest.approx(max(1.2 - gap, 0.0), rel=1e-6)


def test_discrepancy_gradient_raises_head1_and_lowers_head2_entropy():
    l1 = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    l2 = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    discrepancy_loss(l1, l2).backward()
    step = 0.1
    h1 = _row_entropy((l1 - step * l1.grad)[0].tolist())
    h2 = _row_entropy((l2 - step * l2.grad)[0].tolist())
    h0 = _row_entropy(l1[0].tolist())
    assert h1 > h0 > h2


def test_discrepancy_empty_batch_and_bad_shapes():
    l1 = torch.zeros(0, 3, requires_grad=True)
    loss = discrepancy_loss(l1, torch.zeros(0, 3))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="same shape"):
        discrepancy_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        discrepancy_loss(torch.zeros(3), torch.zeros(3))


# ------------------------------------------------------------------------------------------------ ICE
def test_ice_loss_matches_hand_computation():
    h_in = torch.tensor([[-1.0, -4.0], [-3.0, -0.5]])
    y = torch.tensor([0, 1])
    h_out = torch.tensor([[-2.0, -0.7], [-9.0, -30.0]])
    ce = F.cross_entropy(h_in, y).item()
    id_nll = (1.0 + 0.5) / 2
    out_nll = (-math.log(1 - math.exp(-0.7)) - math.log(1 - math.exp(-9.0))) / 2
    assert ice_loss(h_in, y, h_out) == pytest.approx(ce + id_nll + out_nll, rel=1e-6)
    terms = ice_loss_terms(h_in, y, h_out, lam=0.3)
    assert terms["id_nll"] == pytest.approx(id_nll) and terms["outlier_nll"] == pytest.approx(out_nll, rel=1e-6)
    assert terms["loss"] == pytest.approx(ce + 0.3 * (id_nll + out_nll), rel=1e-6)


def test_log1mexp_accurate_over_range():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -2.0, -40.0], dtype=torch.float64)
    # each value by the formula that is accurate for it (log1p(-exp) far from 0, log(-expm1) near 0)
    expected = torch.tensor([math.log1p(-math.exp(v)) if v < -1 else math.log(-math.expm1(v)) for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=0)
    # float32: the naive log(1 - exp(x)) is -inf at -1e-8 and 0 at -40; log1mexp stays accurate
    assert torch.isinf(torch.log(1 - torch.exp(x.float()[:1]))).all()
    torch.testing.assert_close(log1mexp(x.float()), expected.float(), rtol=1e-5, atol=0)


def test_ice_outlier_term_is_finite_at_h_zero():
    h_out = torch.tensor([[0.0, -1.0], [-1e-12, -3.0], [-50.0, -60.0]], requires_grad=True)
    nll = ice_outlier_nll(h_out, eps=1e-6)
    assert torch.isfinite(nll).all()
    assert nll[0].item() == pytest.approx(-math.log(1e-6), rel=1e-3)  # clamped to -eps
    assert nll[2].item() == pytest.approx(math.exp(-50.0), rel=1e-3)
    nll.sum().backward()
    assert torch.isfinite(h_out.grad).all()


def test_ice_loss_with_gaussian_head_at_class_mean_is_finite():
    torch.manual_seed(0)
    head = GaussianHead(4, 3)
    with torch.no_grad():
        head.lower.copy_(torch.randn(4, 4) * 0.3)
    z_in = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    # outliers exactly on a class mean (h = 0 there) and right next to one
    z_out = torch.stack([head.means[1].detach(), head.means[2].detach() + 1e-7]).requires_grad_(True)
    h_out = head(z_out)
    assert h_out.max().item() == pytest.approx(0.0, abs=1e-10)
    loss = ice_loss(head(z_in), y, h_out)
    assert torch.isfinite(loss)
    loss.backward()
    for t in [z_in.grad, z_out.grad] + [p.grad for p in head.parameters()]:
        assert t is not None and torch.isfinite(t).all()


def test_ice_loss_gradients_move_features_the_right_way():
    torch.manual_seed(1)
    head = GaussianHead(3, 2)
    with torch.no_grad():
        head.means.copy_(torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))
    z_in = torch.tensor([[0.8, 0.4, -0.2]], requires_grad=True)   # class 0, off its mean
    z_out = torch.tensor([[2.6, 0.2, 0.1]], requires_grad=True)   # an outlier near the class-1 mean
    loss = ice_loss(head(z_in), torch.tensor([0]), head(z_out))
    loss.backward()
    step = 0.01
    with torch.no_grad():
        assert head(z_in - step * z_in.grad)[0, 0] > head(z_in)[0, 0]          # ID feature moves to its mean
        assert head(z_out - step * z_out.grad).max() < head(z_out).max()       # outlier moves away from it


def test_ice_loss_gradcheck_float64():
    torch.manual_seed(2)
    h_in = -torch.rand(3, 4, dtype=torch.float64) * 5
    h_out = -torch.rand(2, 4, dtype=torch.float64) * 3 - 0.01
    y = torch.tensor([0, 3, 1])
    h_in.requires_grad_(True)
    h_out.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ice_loss(a, y, b), (h_in, h_out))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fn", [oe_loss, energy_oe_loss, ice_loss])
def test_bad_inputs_name_the_argument(fn):
    good_in, good_y, good_out = -torch.rand(2, 3), torch.tensor([0, 1]), -torch.rand(4, 3)
    with pytest.raises(ValueError, match="y must have shape"):
        fn(good_in, torch.tensor([0, 1, 2]), good_out)
    with pytest.raises(TypeError, match="y must hold integer"):
        fn(good_in, torch.tensor([0.0, 1.0]), good_out)
    with pytest.raises(ValueError, match="same number of classes"):
        fn(good_in, good_y, -torch.rand(4, 5))
    with pytest.raises(ValueError, match="empty batch"):
        fn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), good_out)
    with pytest.raises(ValueError, match="lam"):
        fn(good_in, good_y, good_out, lam=-1.0)
    with pytest.raises(TypeError, match="floating point"):
        fn(good_in.long(), good_y, good_out)


def test_energy_rejects_bad_temperature():
    with pytest.raises(ValueError, match="T must be > 0"):
        energy(torch.zeros(2, 3), T=0.0)


def test_losses_accept_bfloat16_logits():
    logits_in = torch.randn(4, 3).bfloat16()
    y = torch.tensor([0, 1, 2, 0])
    loss = oe_loss(logits_in, y, torch.randn(2, 3).bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
