"""DRF's batched flows (all K classes of a layer at once) against the per-class loop they replaced: the same
log-likelihoods and input gradients, and the same trained parameters (each class's own Adam trajectory)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import DRF
from fastood.detectors import residual_flow
from fastood.detectors.residual_flow import _StackedFlows

COUNTS = (40, 23, 9)          # unequal classes: 5, 3 and 2 minibatches of 8 per epoch


def _data(d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    y = y[torch.randperm(len(y), generator=gen)]
    x = torch.randn(3, d, generator=gen, dtype=torch.float64)[y] * 2 + torch.randn(len(y), d, generator=gen,
                                                                                    dtype=torch.float64)
    return x + 0.3 * x.roll(1, dims=1) ** 2, y                                  # not Gaussian: the flows learn


def _model(d=6, classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()


def _fit(x, y, **kw):
    kw = {"couplings": 4, "hidden": 5, "epochs": 2, "lr": 1e-2, "batch_size": 8, "seed": 3, **kw}
    return DRF(_model(x.shape[1]), **kw).fit(DataLoader(TensorDataset(x, y), batch_size=16))


def _log_normal(flow, u):
    z, logdet = flow(u)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet


def _loop_log_likelihoods(det, f, layer=0):
    """The old scoring: one ResidualFlow module call per class."""
    cols = [_log_normal(flow, (f - det.means[layer][k]) @ det.whiten[layer].T)
            for k, flow in enumerate(det.flows[layer])]
    return torch.stack(cols, 1) + det.log_det_whiten[layer]


def _fit_keeping_initial_flows(x, y, monkeypatch, **kw):
    """``_fit``, and a copy of each layer's flows as initialized (their Linear weights come from the global RNG)."""
    initial, train = [], DRF._train_flows

    def spy(self, layer, *args, **kwargs):
        initial.append(copy.deepcopy(self.flows[layer]))
        return train(self, layer, *args, **kwargs)

    monkeypatch.setattr(DRF, "_train_flows", spy)
    return _fit(x, y, **kw), initial


def _loop_fit(det, initial, x, y, step_idle_classes=False, layer=0):
    """The old fit of each class's flow alone (torch.optim.Adam, its own seeded minibatch order) from the
    ``initial`` flows; with ``step_idle_classes`` a wrong variant whose Adam also steps (on a zero gradient) while
    the class has no batch."""
    u_all = (x - det.means[layer][y]) @ det.whiten[layer].T
    flows, opts, gens, us = [], [], [], []
    for c in det.classes.tolist():
        seed = det.seed + 1000 * layer + c
        flows.append(copy.deepcopy(initial[c]).requires_grad_(True))
        opts.append(torch.optim.Adam(flows[-1].parameters(), lr=det.lr))
        gens.append(torch.Generator().manual_seed(seed))
        us.append(u_all[y == c])
    most = max(-(-len(u) // det.batch_size) for u in us)
    for _ in range(det.epochs):
        for flow, opt, gen, u in zip(flows, opts, gens, us):
            order = torch.randperm(u.shape[0], generator=gen)
            for j in range(most):
                batch = u[order[j * det.batch_size:(j + 1) * det.batch_size]]
                if batch.shape[0] == 0 and not step_idle_classes:
                    break
                loss = -_log_normal(flow, batch).mean() if batch.shape[0] else \
                    0 * sum(p.sum() for p in flow.parameters())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return flows


def _randomize(flows, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flows.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("couplings,hidden", [(4, 5), (3, None)])
def test_batched_scoring_equals_the_per_flow_loop(couplings, hidden):
    x, y = _data()
    det = _fit(x, y, couplings=couplings, hidden=hidden)
    q = torch.randn(7, 6, dtype=torch.float64) * 2
    for randomized in (False, True):
        if randomized:                      # far from the identity; also checks the stacked cache is rebuilt
            _randomize(det.flows[0])
        want = _loop_log_likelihoods(det, q)
        got = det.log_likelihoods([q])[0]
        assert got.shape == (7, 3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        (ga,) = torch.autograd.grad(det.log_likelihoods([qa])[0].amax(1).sum(), qa)
        (gb,) = torch.autograd.grad(_loop_log_likelihoods(det, qb).amax(1).sum(), qb)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        for k in range(3):                  # every class column's input gradient, not only the argmax's
            (ga,) = torch.autograd.grad(det.log_likelihoods([qa])[0][:, k].sum(), qa)
            (gb,) = torch.autograd.grad(_loop_log_likelihoods(det, qb)[:, k].sum(), qb)
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mutation", ["mask", "permutation"])
def test_the_equality_check_catches_a_wrong_mask_or_permutation(mutation, monkeypatch):
    x, y = _data()
    det = _fit(x, y)
    _randomize(det.flows[0])
    q = torch.randn(7, 6, dtype=torch.float64) * 2
    real_init = _StackedFlows.__init__

    def mutated(self, flows):
        real_init(self, flows)
        if mutation == "mask":              # coupling 0 keeps the second half instead of the first
            self.take[0] = self.take[0][::-1]
        else:                               # class 0 gets class 1's permutation
            self.index[1] = self.index[1][[1, 1, 2]]

    monkeypatch.setattr(_StackedFlows, "__init__", mutated)
    det._stacked = None
    got = det.log_likelihoods([q])[0]
    assert not torch.allclose(got, _loop_log_likelihoods(det, q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eval_rows", [4096, 8])
def test_batched_fit_equals_each_class_trained_alone(eval_rows, monkeypatch):
    monkeypatch.setattr(residual_flow, "_EVAL_ROWS", eval_rows)     # 8: chunks where some classes have run out
    x, y = _data()
    det, (init,) = _fit_keeping_initial_flows(x, y, monkeypatch)
    ref = _loop_fit(det, init, x, y)
    wrong = _loop_fit(det, init, x, y, step_idle_classes=True)
    for k in range(3):
        got, want = det.flows[0][k].state_dict(), ref[k].state_dict()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=f"class {k} {name}")
        moved = max((got[n] - v).abs().max() for n, v in init[k].state_dict().items())
        assert moved > 1e-3                                          # training did change the flow
        if k > 0:                                                    # classes 1, 2 have idle steps: the wrong
            assert max((wrong[k].state_dict()[n] - v).abs().max()   # variant's trajectory is visibly different
                       for n, v in want.items()) > 1e-6
    u = (x - det.means[0][y]) @ det.whiten[0].T
    with torch.no_grad():
        want_ll = torch.cat([_log_normal(ref[k], u[y == k]) for k in range(3)]).mean() + det.log_det_whiten[0]
    assert det.train_log_likelihood[0] == pytest.approx(float(want_ll), rel=1e-10)


def test_dimension_one_and_no_training():
    x, y = _data(d=1)
    det = _fit(x, y, couplings=2)
    q = torch.randn(5, 1, dtype=torch.float64)
    torch.testing.assert_close(det.log_likelihoods([q])[0], _loop_log_likelihoods(det, q), rtol=1e-12, atol=1e-12)
    det0 = _fit(*_data(), epochs=0)
    q = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(det0.log_likelihoods([q])[0], _loop_log_likelihoods(det0, q), rtol=1e-12,
                               atol=1e-12)
