"""GM, DRF, OpenMax, ReAct and KNN (issue 20, first half): each paper's equation computed here independently on a
small float64 case, the errors, the streaming fits, KNN's exact and approximate search, and the agreement with
pytorch-ood's outputs recorded in tests/data/reference_detectors/posthoc_a.json (pytorch-ood not needed here)."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import DETECTORS, DRF, GM, KNN, OpenMax, ReAct
from fastood.detectors._feature_hooks import forward_with_taps, resolve_layers
from fastood.detectors.gram import gram_vectors
from fastood.detectors.knn import kth_neighbour
from fastood.detectors.openmax import weibull_fit
from fastood.detectors.react import percentile
from fastood.metrics import ood_metrics

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "reference_detectors", "posthoc_a.json")


def _mlp(d_in=5, hidden=6, classes=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def _penultimate(net, x):
    with torch.no_grad():
        return net[1](net[0](x)).double()


def _loader(x, y=None, batch_size=16):
    return DataLoader(TensorDataset(x, y if y is not None else torch.zeros(len(x), dtype=torch.long)),
                      batch_size=batch_size)


def _reference():
    with open(REFERENCE) as f:
        return json.load(f)


def _linear_model(weight, bias):
    """Flatten + Linear: the penultimate features are the input itself."""
    head = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return nn.Sequential(nn.Flatten(), head)


# ============================================================================ shared feature helper
def test_forward_with_taps_reduces_inside_the_hook():
    """``reduce`` sees the layer output before a later in-place op changes it (torchvision's ReLU(inplace=True))."""
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    taps = resolve_layers(net, ["0"], "test")
    (reduced,), out = forward_with_taps(net, x, taps, "test", reduce=lambda t: t.clone())
    (raw,), _ = forward_with_taps(net, x, taps, "test")
    with torch.no_grad():
        torch.testing.assert_close(reduced, net[0](x))
        assert (raw >= 0).all() and (reduced < 0).any()          # the raw tensor was overwritten by the ReLU
        torch.testing.assert_close(out, net(x))
    with pytest.raises(ValueError, match=r"layers \['nope'\] not found"):
        resolve_layers(net, ["nope"], "test")
    with pytest.raises(TypeError, match="cannot find the model's penultimate layer"):
        resolve_layers(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), None, "test")


def test_registry_has_the_new_detectors():
    assert {"gm", "drf", "openmax", "react", "knn"} <= set(DETECTORS)
    assert DETECTORS["knn"] is KNN and DETECTORS["gm"] is GM


# ============================================================================ KNN
def test_knn_is_the_kth_neighbour_distance_of_normalized_features():
    net = _mlp()
    x = torch.randn(70, 5, dtype=torch.float64)
    det = KNN(net, k=4, dtype=torch.float64).fit(_loader(x, batch_size=9))
    q = torch.randn(6, 5, dtype=torch.float64)
    # Paper Alg. 1 by hand: z = phi / |phi|, distances to all training z, the 4th smallest.
    train = _penultimate(net, x).numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    fq = _penultimate(net, q).numpy()
    fq = fq / np.linalg.norm(fq, axis=1, keepdims=True)
    dist = np.linalg.norm(fq[:, None, :] - train[None], axis=2)
    want = np.sort(dist, axis=1)[:, 3]
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-10)
    assert not np.allclose(want, np.sort(dist, axis=1)[:, 4])       # k-th, not (k+1)-th
    assert torch.equal(det.predict_class(q), net(q).argmax(1))
    assert det.bank.shape == (70, 6)                                # KNN holds the N x F bank
    # a named layer instead of the penultimate features (its output pooled)
    det0 = KNN(net, k=4, layer="0", dtype=torch.float64).fit(_loader(x))
    h = net[0](x).detach().numpy()
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    hq = net[0](q).detach().numpy()
    hq = hq / np.linalg.norm(hq, axis=1, keepdims=True)
    np.testing.assert_allclose(det0.score(q).numpy(),
                               np.sort(np.linalg.norm(hq[:, None] - h[None], axis=2), axis=1)[:, 3], rtol=1e-10)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_blockwise_search_equals_brute_force(k):
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(101, 7, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.randn(23, 7, dtype=torch.float64), dim=1)
    d, idx = kth_neighbour(q, bank, k, query_block=5, bank_block=13)   # k = 20 > a bank block: merged top-k
    full = torch.cdist(q, bank)
    want = full.sort(dim=1).values[:, k - 1]
    torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full.gather(1, idx[:, None]).squeeze(1), want)
    with pytest.raises(ValueError, match=r"k must be in \[1, 101\]"):
        kth_neighbour(q, bank, 102)


def test_knn_float32_bank_ranks_like_float64():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(300, 16)
    q = torch.randn(40, 16)
    a = KNN(net, k=7).fit(_loader(x, batch_size=64)).score(q)
    b = KNN(net, k=7, dtype=torch.float64).fit(_loader(x, batch_size=64)).score(q)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_knn_subsample_against_exact():
    """The approximate option (the paper's sampling ratio alpha, k scaled to alpha k) against the exact search:
    6,000 training features from 10 clusters in 64-d, 300 ID queries from the clusters and 300 OOD queries from
    shrunken, wider clusters. Recorded (seed 3): exact AUROC 0.9579; alpha = 50% (k 25): 0.9580, Spearman
    correlation of the scores with the exact ones 0.9994; alpha = 10% (k 5): 0.9501, 0.9949; alpha = 1% (k 1):
    0.9362, 0.9669."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=gen) * 2
    train = centers[torch.arange(6000) % 10] + torch.randn(6000, 64, generator=gen)
    id_q = centers[torch.arange(300) % 10] + torch.randn(300, 64, generator=gen)
    ood_q = centers[torch.arange(300) % 10] * 0.6 + torch.randn(300, 64, generator=gen) * 1.1
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = DataLoader(TensorDataset(train), batch_size=500)
    exact = KNN(net, k=50).fit(loader)
    approx = KNN(net, k=50, fraction=0.1, seed=3).fit(loader)
    assert approx.k_used == 5 and 500 <= approx.bank.shape[0] <= 700      # ~10% kept while streaming
    q = torch.cat([id_q, ood_q])
    se, sa = exact.score(q), approx.score(q)
    m_exact, m_approx = ood_metrics(se[:300], se[300:]), ood_metrics(sa[:300], sa[300:])
    rank = lambda s: s.argsort().argsort().double()
    spearman = float(torch.corrcoef(torch.stack([rank(se), rank(sa)]))[0, 1])
    assert abs(m_exact["auroc"] - 0.9579) < 1e-3 and abs(m_approx["auroc"] - 0.9501) < 1e-3
    assert abs(m_exact["auroc"] - m_approx["auroc"]) < 0.01
    assert spearman > 0.99, spearman
    with pytest.raises(ValueError, match="refit to change the fraction"):
        exact.replace(fraction=0.5).score(q)


def test_knn_errors():
    net = _mlp()
    x = torch.randn(10, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="KNN detector is not fitted"):
        KNN(net).score(x)
    with pytest.raises(ValueError, match="k=50 exceeds the 10 stored"):
        KNN(net).fit(_loader(x))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        KNN(net, k=0)
    with pytest.raises(ValueError, match="fraction must be"):
        KNN(net, fraction=0.0)
    with pytest.raises(ValueError, match=r"layers \['fc9'\] not found"):
        KNN(net, layer="fc9")
    with pytest.raises(TypeError, match="KNN: cannot find the model's penultimate layer"):
        KNN(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="no samples"):
        KNN(net, k=1).fit([])


def test_knn_matches_pytorch_ood_reference():
    ref = _reference()
    f = ref["features"]
    net = _linear_model(f["head_weight"], f["head_bias"])
    det = KNN(net, k=ref["knn"]["k"], dtype=torch.float64).fit(_loader(torch.tensor(f["train"])))
    np.testing.assert_allclose(det.score(torch.tensor(f["test"])).numpy(), ref["knn"]["scores"], rtol=1e-5)


# ============================================================================ ReAct
def test_percentile_is_numpys_linear_interpolation():
    gen = np.random.default_rng(0)
    for n in (1, 2, 7, 1000):
        v = gen.standard_normal(n)
        for p in (0.0, 10.0, 50.0, 90.0, 99.5, 100.0):
            assert math.isclose(percentile(torch.from_numpy(v), p), float(np.percentile(v, p)), rel_tol=1e-12,
                                abs_tol=1e-12)


def test_react_clips_at_the_90th_percentile_then_scores_energy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    train = torch.rand(50, 4, dtype=torch.float64) * 3
    det = ReAct(net).fit(_loader(train, batch_size=8))
    c = np.percentile(train.numpy().ravel(), 90)                 # over every unit of every training image
    assert math.isclose(det.threshold, c, rel_tol=1e-12) and det.fit_exact
    q = torch.rand(6, 4, dtype=torch.float64) * 5
    w, b = net[1].weight.detach().numpy(), net[1].bias.detach().numpy()
    f = np.minimum(q.numpy(), c) @ w.T + b                       # Eq. 1-2: clip above only, then the head
    want = -np.log(np.exp(f).sum(1))                             # -energy score, higher = more OOD
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-6)
    assert not np.allclose(want, -np.log(np.exp(np.minimum(q.numpy(), np.percentile(train.numpy(), 80)) @ w.T
                                                + b).sum(1)), rtol=1e-3)
    assert torch.equal(det.predict_class(q), torch.from_numpy(f.argmax(1)))
    # a given threshold needs no fit
    torch.testing.assert_close(ReAct(net, threshold=float(c)).score(q), det.score(q))


def test_react_named_conv_layer_is_clipped_elementwise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    x = torch.randn(20, 1, 5, 5)
    det = ReAct(net, layer="0", percentile=75).fit(_loader(x, batch_size=6))
    with torch.no_grad():
        maps = net[0](x)
        c = np.percentile(maps.double().numpy().ravel(), 75)
        q = torch.randn(4, 1, 5, 5)
        logits = net[1:](net[0](q).clamp(max=float(c)))
    assert math.isclose(det.threshold, c, rel_tol=1e-6)
    torch.testing.assert_close(det.score(q), -torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)


def test_react_fit_memory_is_bounded_by_max_samples():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    x = torch.rand(2000, 8)                                     # 16,000 activation values
    exact = ReAct(net).fit(_loader(x, batch_size=100))
    sampled = ReAct(net, max_samples=4000, seed=1).fit(_loader(x, batch_size=100))
    assert exact.fit_exact and not sampled.fit_exact
    assert math.isclose(exact.threshold, np.percentile(x.numpy(), 90), rel_tol=1e-6)
    # a 4,000-value uniform sample: the 90th percentile of U(0, 1) within a few rank standard errors (0.005)
    assert abs(sampled.threshold - exact.threshold) < 0.02


def test_react_errors_and_reference():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="ReAct detector is not fitted"):
        ReAct(net).score(torch.randn(2, 4))
    with pytest.raises(ValueError, match="percentage"):
        ReAct(net, percentile=0.0)
    with pytest.raises(ValueError, match=r"layers \['x'\] not found"):
        ReAct(net, layer="x")
    with pytest.raises(TypeError, match="ReAct: cannot find the model's penultimate layer"):
        ReAct(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    fitted = ReAct(net).fit(_loader(torch.rand(10, 4)))
    assert fitted.replace(percentile=95).threshold is None      # a new percentile needs a refit
    ref = _reference()
    f = ref["features"]
    det = ReAct(_linear_model(f["head_weight"], f["head_bias"]), percentile=ref["react"]["percentile"])
    det.fit(_loader(torch.relu(torch.tensor(f["train"]))))
    assert math.isclose(det.threshold, ref["react"]["threshold"], rel_tol=1e-6)
    np.testing.assert_allclose(det.score(torch.relu(torch.tensor(f["test"]))).numpy(), ref["react"]["scores"],
                               rtol=1e-5, atol=1e-5)


# ============================================================================ OpenMax
def test_weibull_fit_is_the_maximum_likelihood_point():
    gen = np.random.default_rng(0)
    for x in (gen.weibull(2.0, 30) * 3 + 0.1, 10000.0 + np.sort(gen.random(20)) * 4):   # libMR-translated tail too
        k, lam = weibull_fit(torch.from_numpy(x))

        def nll(k, lam):
            return -np.sum(np.log(k / lam) + (k - 1) * np.log(x / lam) - (x / lam) ** k)

        base = nll(k, lam)
        for dk, dl in ((1e-3, 0), (-1e-3, 0), (0, 1e-7), (0, -1e-7), (1e-3, 1e-7)):
            assert nll(k * (1 + dk), lam * (1 + dl)) > base   # a local minimum of the negative log-likelihood
    scipy_stats = pytest.importorskip("scipy.stats")
    x = gen.weibull(1.5, 25) * 2
    k, lam = weibull_fit(torch.from_numpy(x))
    c, _, scale = scipy_stats.weibull_min.fit(x, floc=0)
    assert math.isclose(k, c, rel_tol=1e-3) and math.isclose(lam, scale, rel_tol=1e-3)
    with pytest.raises(ValueError, match="all samples are equal"):
        weibull_fit(torch.ones(5))


def _openmax_by_hand(train, y, test, tail, alpha, distance):
    """Alg. 1-2 written with loops (MAVs of correctly classified images, Weibull on the translated tail)."""
    c = train.shape[1]
    keep = train.argmax(1) == y
    train, y = train[keep], y[keep]

    def dist(v, mu):
        e = np.linalg.norm(v - mu)
        cos = 1 - v @ mu / (np.linalg.norm(v) * np.linalg.norm(mu))
        return {"euclidean": e, "cosine": cos, "eucos": e / 200 + cos}[distance]

    mav, models = [], []
    for j in range(c):
        mu = train[y == j].mean(0)
        d = np.sort([dist(v, mu) for v in train[y == j]])[-tail:]
        k, lam = weibull_fit(torch.from_numpy(d + 10000 - d.min()))
        mav.append(mu)
        models.append((k, lam, d.min()))
    probs = []
    for v in test:
        order = np.argsort(-v)
        w = np.ones(c)
        for i in range(1, alpha + 1):
            j = order[i - 1]
            k, lam, tmin = models[j]
            cdf = 1 - math.exp(-((dist(v, mav[j]) + 10000 - tmin) / lam) ** k)
            w[j] = 1 - (alpha + 1 - i) / alpha * cdf
        revised = np.concatenate([[np.sum(v * (1 - w))], v * w])
        e = np.exp(revised - revised.max())
        probs.append(e / e.sum())
    return np.array(probs)


@pytest.mark.parametrize("distance", ["eucos", "euclidean"])
def test_openmax_recalibration_matches_the_algorithm(distance):
    gen = torch.Generator().manual_seed(0)
    means = 5 * torch.eye(3, dtype=torch.float64) + torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.5
    y = torch.arange(120) % 3
    train = means[y] + torch.randn(120, 3, generator=gen, dtype=torch.float64) * 1.5   # some misclassified
    test = torch.cat([means + 0.3, torch.randn(3, 3, generator=gen, dtype=torch.float64) * 6])
    det = OpenMax(nn.Identity(), tail_size=10, alpha=2, distance=distance)
    det.model = nn.Sequential(nn.Identity(), nn.Linear(3, 3)).double()   # float64 identity: logits = input
    with torch.no_grad():
        det.model[1].weight.copy_(torch.eye(3))
        det.model[1].bias.zero_()
    det.fit(_loader(train, y, batch_size=32))
    want = _openmax_by_hand(train.numpy(), y.numpy(), test.numpy(), 10, 2, distance)
    np.testing.assert_allclose(det.recalibrated(test).numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(det.score(test).numpy(), want[:, 0], rtol=1e-9, atol=1e-12)
    assert det.score(test)[3:].mean() > det.score(test)[:3].mean()       # far from every MAV: more unknown
    # replace(tail_size=...) refits the Weibull models from the activation vectors fit kept (no data pass)
    again = OpenMax(det.model, tail_size=6, alpha=2, distance=distance).fit(_loader(train, y, batch_size=50))
    torch.testing.assert_close(det.replace(tail_size=6).score(test), again.score(test), rtol=1e-12, atol=1e-12)


def test_openmax_errors_and_reference():
    with pytest.raises(RuntimeError, match="OpenMax detector is not fitted"):
        OpenMax(nn.Linear(3, 3)).score(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"without labels"):
        OpenMax(nn.Linear(3, 3)).fit([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="tail_size must be"):
        OpenMax(nn.Linear(3, 3), tail_size=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        OpenMax(nn.Linear(3, 3), distance="manhattan")
    with pytest.raises(TypeError, match="needs a model returning logits"):
        OpenMax(nn.Identity()).fit([(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long))])
    ref = _reference()["openmax"]
    det = OpenMax(nn.Identity(), tail_size=ref["tail_size"], alpha=ref["alpha"], distance="euclidean",
                  correct_only=False).fit(_loader(torch.tensor(ref["train"]), torch.tensor(ref["train_labels"])))
    test = torch.tensor(ref["test"])
    weib = ref["weibull"]
    np.testing.assert_allclose(det.tail_min.numpy(), weib["tail_min"], rtol=1e-6)
    # The Weibull fits differ: scipy's is a numerical optimum, fastood's the likelihood root, never worse.
    _, v_y = det._activations
    d = det.distances(det._activations[0]).gather(1, v_y[:, None]).squeeze(1).numpy()
    for c in range(4):
        tail = np.sort(d[v_y.numpy() == c])[-ref["tail_size"]:] + 10000 - weib["tail_min"][c]

        def nll(k, lam):
            return -np.sum(np.log(k / lam) + (k - 1) * np.log(tail / lam) - (tail / lam) ** k)

        assert nll(float(det.shape[c]), float(det.scale[c])) <= nll(weib["shape"][c], weib["scale"][c]) + 1e-9
    # pytorch-ood works in float32 (the logits as a float32 numpy array: distances, and the translated tail
    # 10000 + d, whose float32 spacing is 1e-3, in float32) and fits with scipy's optimizer: 2e-4 apart here.
    np.testing.assert_allclose(det.score(test).numpy(), ref["scores"], rtol=0, atol=2e-4)
    assert np.abs(det.score(test).numpy() - ref["scores"]).max() > 1e-6   # (the difference is real, not rounding)


# ============================================================================ GM
def test_gram_vectors_are_row_sums_of_the_pth_order_gram_matrix():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    got = gram_vectors(t, (1, 2, 3))
    for b in range(2):
        f = t[b].reshape(3, 4).numpy()
        for i, p in enumerate((1, 2, 3)):
            g = (f ** p) @ (f ** p).T                              # G_p = (F^p F^p^T)^(1/p), signed root
            rows = g.sum(1)
            np.testing.assert_allclose(got[b, i].numpy(), np.sign(rows) * np.abs(rows) ** (1 / p), rtol=1e-12)


def _gm_by_hand(net, layers, orders, train, val, test):
    """Eq. 3-4 with numpy: ranges per predicted class, layer deviations normalized by the validation mean."""
    def grams(x):
        out, acts = [], {}
        handles = [dict(net.named_modules())[n].register_forward_hook(
            (lambda n: lambda m, a, o: acts.__setitem__(n, o.detach().double().numpy()))(n)) for n in layers]
        with torch.no_grad():
            pred = net(x).argmax(1).numpy()
        for h in handles:
            h.remove()
        for n in layers:
            f = acts[n].reshape(acts[n].shape[0], acts[n].shape[1], -1)
            per = []
            for p in orders:
                g = np.einsum("bik,bjk->bij", f ** p, f ** p).sum(2)
                per.append(np.sign(g) * np.abs(g) ** (1 / p))
            out.append(np.stack(per, 1))
        return out, pred

    gt, pt = grams(train)
    ranges = [{c: (g[pt == c].min(0), g[pt == c].max(0)) for c in np.unique(pt)} for g in gt]

    def dev(gs, pred):
        out = np.zeros((len(pred), len(gs)))
        for l, g in enumerate(gs):
            for b, c in enumerate(pred):
                mn, mx = ranges[l][c]
                out[b, l] = (np.maximum(mn - g[b], 0) / np.abs(mn + 1e-6)
                             + np.maximum(g[b] - mx, 0) / np.abs(mx + 1e-6)).sum()
        return out

    expected = dev(*grams(val)).mean(0) + 1e-7
    return (dev(*grams(test)) / expected).sum(1), expected


def test_gm_score_matches_the_paper_equations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[-1].weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5]]))
    train = torch.rand(60, 1, 5, 5, dtype=torch.float64) * 2 - 1
    val = torch.rand(20, 1, 5, 5, dtype=torch.float64) * 2 - 1
    test = torch.cat([torch.rand(4, 1, 5, 5, dtype=torch.float64) * 2 - 1,
                      torch.randn(4, 1, 5, 5, dtype=torch.float64) * 3])
    with torch.no_grad():                                  # a bias that splits the training images between classes
        gap = net(train)[:, 0] - net(train)[:, 1]
        net[-1].bias.copy_(torch.tensor([-float(gap.median()) - 1e-3, 0.0]))
    layers, orders = ["1", "2"], (1, 2, 3)
    det = GM(net, layers=layers, orders=orders).fit(_loader(train, batch_size=7), val_loader=_loader(val))
    want, expected = _gm_by_hand(net, layers, orders, train, val, test)
    assert set(det.predict_class(torch.cat([train, test])).tolist()) == {0, 1}
    np.testing.assert_allclose(det.expected.numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(det.score(test).numpy(), want, rtol=1e-9, atol=1e-12)
    assert det.score(test)[4:].mean() > det.score(test)[:4].mean()
    # streaming: another batching gives the same tables (running min / max are exact)
    other = GM(net, layers=layers, orders=orders).fit(_loader(train, batch_size=60), val_loader=_loader(val))
    for a, b in zip(det.mins + det.maxs, other.mins + other.maxs):
        assert torch.equal(a, b)


def test_gm_holds_out_a_bounded_validation_sample_when_no_val_loader():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(200, 1, 4, 4)
    det = GM(net, orders=(1, 2), val_size=5).fit(_loader(x, batch_size=25))
    assert det.layers == ["0"] and det.mins[0].shape == (2, 2, 2)
    assert torch.isfinite(det.expected).all() and (det.expected > 0).all()
    assert 8 <= det.held_out <= 35 and det.val_count == 5      # ~10% held out, at most val_size of them kept
    # the held-out images are kept out of the ranges: fitting on everything widens them
    half = GM(net, orders=(1, 2), val_fraction=0.5).fit(_loader(x, batch_size=25))
    full = GM(net, orders=(1, 2)).fit(_loader(x, batch_size=25), val_loader=_loader(x[:10]))
    assert full.held_out == 0 and full.val_count == 10
    assert (full.mins[0] <= half.mins[0]).all() and (full.maxs[0] >= half.maxs[0]).all()
    assert (full.mins[0] < half.mins[0]).any() or (full.maxs[0] > half.maxs[0]).any()


def test_gm_errors_and_reference():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(RuntimeError, match="GM detector is not fitted"):
        GM(net).score(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="has no nn.Conv2d"):
        GM(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"layers \['conv9'\] not found"):
        GM(net, layers=["conv9"])
    with pytest.raises(ValueError, match="orders must be"):
        GM(net, orders=[0])
    with pytest.raises(TypeError, match="GM needs a model returning logits"):
        GM(nn.Sequential(nn.Conv2d(1, 2, 3)), layers=["0"]).fit(_loader(torch.randn(4, 1, 4, 4)))
    ref = _reference()["gram"]
    conv1, conv2, lin = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
    with torch.no_grad():
        for m, name in ((conv1, "conv1"), (conv2, "conv2"), (lin, "lin")):
            m.weight.copy_(torch.tensor(ref[f"{name}_weight"]))
            m.bias.copy_(torch.tensor(ref[f"{name}_bias"]))
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    det = GM(model, layers=["0", "2"], orders=ref["orders"], classes_from="label", normalize=False)
    det.fit(_loader(torch.tensor(ref["train"]), torch.tensor(ref["train_labels"]), batch_size=20))
    np.testing.assert_allclose(det.score(torch.tensor(ref["test"])).numpy(), ref["scores"], rtol=1e-4, atol=1e-5)


# ============================================================================ DRF
def _gaussian_features(n=90, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    means = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 3
    mix = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    return means[y] + torch.randn(n, 4, generator=gen, dtype=torch.float64) @ mix, y


def _identity_model(d=4, classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()


def test_drf_without_training_is_the_class_gaussian_log_likelihood():
    x, y = _gaussian_features()
    det = DRF(_identity_model(), epochs=0).fit(_loader(x, y, batch_size=16))
    q = torch.randn(5, 4, dtype=torch.float64) * 3
    xs, ys = x.numpy(), y.numpy()
    means = np.stack([xs[ys == c].mean(0) for c in range(3)])
    centered = xs - means[ys]
    cov = centered.T @ centered / len(xs)
    inv = np.linalg.inv(cov)
    _, logdet = np.linalg.slogdet(2 * np.pi * cov)
    ll = np.array([[-0.5 * (v - m) @ inv @ (v - m) - 0.5 * logdet for m in means] for v in q.numpy()])
    np.testing.assert_allclose(det.score(q).numpy(), -ll.max(1), rtol=1e-9)      # -max_c log p_c(z)


def test_drf_log_likelihood_is_the_change_of_variables_of_its_flow():
    x, y = _gaussian_features()
    x = x + 0.3 * x.roll(1, dims=1) ** 2                                         # not Gaussian: the flow learns
    det = DRF(_identity_model(), couplings=4, hidden=8, epochs=3, lr=1e-2, batch_size=16).fit(_loader(x, y))
    q = torch.randn(3, 4, dtype=torch.float64) * 2
    lls = det.log_likelihoods([q])[0]                                           # [3, K]
    for c in range(3):
        flow, mu, a = det.flows[0][c], det.means[0][c], det.whiten[0]

        def full_map(v):
            return flow(((v - mu) @ a.T)[None])[0][0]

        for b in range(3):
            z = full_map(q[b])
            jac = torch.autograd.functional.jacobian(full_map, q[b])          # d z / d x, 4 x 4
            want = -0.5 * (z @ z) - 2 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1]
            torch.testing.assert_close(lls[b, c], want, rtol=1e-9, atol=1e-9)
    # the trained flows are not the identity, and they fit the training data better than the Gaussian
    gauss = DRF(_identity_model(), epochs=0).fit(_loader(x, y))
    assert det.train_log_likelihood[0] > gauss.train_log_likelihood[0] + 0.05


def test_drf_perturbation_raises_the_likelihood_and_errors():
    x, y = _gaussian_features()
    net = _identity_model()
    det = DRF(net, epochs=1, couplings=2, epsilon=0.05).fit(_loader(x, y))
    q = torch.randn(4, 4, dtype=torch.float64)
    plain = det.replace(epsilon=0.0)
    assert (det.score(q) < plain.score(q)).all()        # the step moves towards the most likely class
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(RuntimeError, match="DRF detector is not fitted"):
        DRF(net).score(q)
    with pytest.raises(ValueError, match="without labels"):
        DRF(net).fit([q])
    with pytest.raises(ValueError, match="epsilon must be"):
        DRF(net, epsilon=-1)
    with pytest.raises(ValueError, match=r"layers \['nope'\] not found"):
        DRF(net, layers=["nope"])
    with pytest.raises(TypeError, match="DRF: cannot find the model's penultimate layer"):
        DRF(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


# ============================================================================ all five: the common contract
@pytest.mark.parametrize("make", [lambda m: KNN(m, k=3), lambda m: ReAct(m), lambda m: OpenMax(m, tail_size=5),
                                  lambda m: GM(m, orders=(1, 2)), lambda m: DRF(m, epochs=1, couplings=2)])
def test_contract_on_a_small_cnn(make):
    from fastood.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=3, image_size=28, width=4, feat_dim=8)
    x = torch.rand(48, 1, 28, 28) * 2 - 1
    y = torch.arange(48) % 3
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # e.g. GM: a class no training image is predicted as
        det = make(net).fit(_loader(x, y, batch_size=16))
    assert all(m.training for m in net.modules())           # modes restored after fit ...
    s = det(x[:5])
    assert s.shape == (5,) and torch.isfinite(s).all() and s.dtype == det.score_dtype
    assert all(m.training for m in net.modules())           # ... and after scoring
    assert det.score_loader(_loader(x[:10], batch_size=4)).shape == (10,)
    assert torch.equal(det.predict_class(x[:5]), net.eval()(x[:5]).argmax(1)) or isinstance(det, ReAct)


def test_torchvision_model_features_by_layer_name():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()          # torchvision's ResNet, one block a stage
    x = torch.rand(9, 3, 16, 16) * 2 - 1
    y = torch.arange(9) % 3
    with torch.no_grad():
        trunk = nn.Sequential(*list(net.children())[:-1])              # up to avgpool: the penultimate features
        pen = trunk(x).flatten(1).double()
        l4 = nn.Sequential(*list(net.children())[:-2])(x).mean(dim=(2, 3)).double()
    knn = KNN(net, k=2, dtype=torch.float64).fit(_loader(x, y, batch_size=5))
    torch.testing.assert_close(knn.bank, pen / pen.norm(dim=1, keepdim=True))
    knn4 = KNN(net, k=2, layer="layer4", dtype=torch.float64).fit(_loader(x, y, batch_size=5))
    torch.testing.assert_close(knn4.bank, l4 / l4.norm(dim=1, keepdim=True))
    react = ReAct(net).fit(_loader(x, y))
    assert math.isclose(react.threshold, np.percentile(pen.numpy(), 90), rel_tol=1e-5)
    with torch.no_grad():
        want = -torch.logsumexp(net.fc(pen.float().clamp(max=react.threshold)), 1)
    torch.testing.assert_close(react.score(x), want, rtol=1e-5, atol=1e-5)
    gm = GM(net, orders=(1, 2))
    assert len(gm.layers) == 12 and gm.layers[0] == "conv1"                  # every Conv2d by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # a class no training image is predicted as
        gm = GM(net, layers=["layer1", "layer4"], orders=(1, 2)).fit(_loader(x, y, batch_size=5),
                                                                    val_loader=_loader(x))
    assert gm.mins[1].shape == (3, 2, 512) and torch.isfinite(gm.score(x)).all()
    assert (gm.score(x) == 0).all()                                        # training images lie inside the ranges
    with pytest.raises(ValueError, match=r"layers \['layer9'\] not found"):
        KNN(net, layer="layer9")


def test_drf_perturbation_matches_manual_autograd():
    x, y = _gaussian_features()
    net = _identity_model()
    eps = 0.05
    det = DRF(net, epochs=2, couplings=2, hidden=6, epsilon=eps).fit(_loader(x, y))
    q = torch.randn(4, 4, dtype=torch.float64) * 2

    def nll(v):                                   # -max_c log p_c(z), z = v (the model's penultimate input)
        return -det.log_likelihoods([v])[0].amax(1)

    qr = q.clone().requires_grad_()
    (grad,) = torch.autograd.grad(nll(qr).sum(), qr)
    with torch.no_grad():
        want = nll(q - eps * grad.sign())         # the step towards the most likely class, then scored there
    torch.testing.assert_close(det.score(q), want, rtol=1e-10, atol=1e-10)
