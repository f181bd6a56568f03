import math

import pytest
import torch
from torch import nn

import fastood.ops as ops
from fastood.samplers.langevin import LangevinSampler
from fastood.samplers.noise import GaussianNoiseSampler, UniformNoiseSampler

from conftest import DEVICES

SHAPE = (1, 6, 6)


def tiny_cnn(seed=1, channels=1, classes=3):
    """Conv-BN-ReLU-Linear on 6x6 images: per-sample in eval mode, so chains are independent."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, classes))


def uniform_init(n=16, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g) * 2 - 1


def run(sampler, model, init, n=None, shape=SHAPE):
    x = sampler.sample(model, init.shape[0] if n is None else n, shape, init=init)
    return x, sampler.stats


def explode_at(model, fail_at):
    """Make ``model``'s last layer raise on its ``fail_at``-th call (a hook runs whether or not BN is folded)."""
    calls = []

    def hook(module, inputs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")

    model[-1].register_forward_pre_hook(hook)
    return calls


class InputFree(nn.Module):
    """Logits independent of the input: the energy gradient is zero, so a step is pure noise."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0, -1.0]))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


# ------------------------------------------------------------------------------------------------ bounds, shapes
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (-0.25, 0.5), ([-1.0, -0.5, 0.0], [0.0, 0.5, 1.0])])
def test_samples_stay_in_bounds(bounds):
    model = tiny_cnn(channels=3)
    sampler = LangevinSampler(max_steps=3, early_stop=None, noise="paper", step_size=0.5, bounds=bounds)
    x = sampler.sample(model, 24, (3, 6, 6))
    lo = torch.tensor(bounds[0]).reshape(1, -1, 1, 1) if isinstance(bounds[0], list) else torch.tensor(bounds[0])
    hi = torch.tensor(bounds[1]).reshape(1, -1, 1, 1) if isinstance(bounds[1], list) else torch.tensor(bounds[1])
    assert x.shape == (24, 3, 6, 6) and x.dtype == torch.float32 and not x.requires_grad
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    # the noise is large enough that every channel's box is actually reached
    assert bool(((x == lo) | (x == hi)).any())


def test_init_outside_bounds_is_clamped_and_uniform_init_fills_box():
    model = tiny_cnn()
    init = torch.full((4,) + SHAPE, 5.0)
    x, _ = run(LangevinSampler(max_steps=0, bounds=(-1, 1)), model, init)
    assert torch.equal(x, torch.ones_like(x))
    x = LangevinSampler(max_steps=0, bounds=(0.2, 0.4)).sample(model, 256, SHAPE)
    assert 0.2 <= float(x.min()) < 0.21 and 0.39 < float(x.max()) <= 0.4


def test_float64_model_gives_float64_samples():
    model = tiny_cnn().double()
    x = LangevinSampler(max_steps=2).sample(model, 3, SHAPE)
    assert x.dtype == torch.float64


def test_zero_samples():
    model = tiny_cnn()
    sampler = LangevinSampler()
    x = sampler.sample(model, 0, SHAPE)
    assert x.shape == (0,) + SHAPE
    assert sampler.stats["steps"].shape == (0,) and sampler.stats["forwards"] == 0


# ------------------------------------------------------------------------------------------------ model hygiene
@pytest.mark.parametrize("fold", [True, False])
def test_model_mode_and_requires_grad_restored_and_no_parameter_grads(fold):
    model = tiny_cnn()
    model.train()
    model[1].eval()                       # a mixed-mode model must come back mixed
    model[0].bias.requires_grad_(False)   # and a frozen parameter must stay frozen
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    seen = []
    # a hook on the last layer (run by the folded view too) records the model's state while sampling
    model[4].register_forward_pre_hook(lambda mod, inp: seen.append(
        ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])))
    sampler = LangevinSampler(max_steps=3, early_stop=None, fold_batchnorm=fold)
    sampler.sample(model, 8, SHAPE)
    assert sampler.stats["folded"] == (1 if fold else 0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    # while sampling: eval mode, every parameter frozen
    assert len(seen) >= 4 and all(not any(training) and not any(rg) for training, rg in seen)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("fail_at", [1, 4])
def test_state_restored_after_exception_mid_sampling(fail_at, fold):
    model = tiny_cnn()
    calls = explode_at(model, fail_at)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        LangevinSampler(max_steps=5, early_stop=None, fold_batchnorm=fold).sample(model, 4, SHAPE)
    assert len(calls) == fail_at
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_logits_raise():
    model = tiny_cnn()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        LangevinSampler(max_steps=2, early_stop=None).sample(model, 4, SHAPE)
    assert all(p.requires_grad for p in model.parameters())


def test_works_under_no_grad_but_not_inference_mode():
    model = tiny_cnn()
    with torch.no_grad():
        x = LangevinSampler(max_steps=2).sample(model, 4, SHAPE)
    assert x.shape == (4,) + SHAPE
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        LangevinSampler().sample(model, 4, SHAPE)


# ------------------------------------------------------------------------------------------------ dynamics
def test_energy_decreases_over_steps():
    model = tiny_cnn()
    init = uniform_init(32)
    sampler = LangevinSampler(max_steps=0, early_stop=None, noise="authors", step_size=0.05)
    torch.manual_seed(0)
    _, start = run(sampler, model, init)
    e0, c0 = start["energy"].clone(), start["confidence"].clone()
    sampler.max_steps = 12
    _, end = run(sampler, model, init)
    assert float(end["energy"].mean()) < float(e0.mean())
    assert float((end["energy"] < e0).float().mean()) > 0.8       # most chains went downhill
    assert float(end["confidence"].mean()) > float(c0.mean())      # lower energy = more confident here


def test_stats_match_the_returned_samples():
    model = tiny_cnn().eval()
    # fp32: "auto" is bfloat16 on a CPU with AMX/AVX512-BF16, where the stats come from the bf16 forward's logits
    # (test_sampler_precision.py checks that case)
    x, st = run(LangevinSampler(max_steps=4, early_stop=None, precision="fp32"), model, uniform_init(8))
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(st["confidence"], torch.softmax(logits, 1).amax(1))
    torch.testing.assert_close(st["energy"], ops.reference.modified_energy(logits))
    assert torch.equal(st["steps"], torch.full((8,), 4))
    assert st["forwards"] == 8 * 5 and st["passes"] == 5   # max_steps updates + one measuring forward


def trajectory(model, init, steps):
    """Noise-free chains from ``init``: states X_0..X_steps [steps + 1, n, ...] and their confidences [steps + 1, n]."""
    states, confs = [init], []
    _, st = run(LangevinSampler(max_steps=0, early_stop=None, noise=None), model, init)
    confs.append(st["confidence"])
    one = LangevinSampler(max_steps=1, early_stop=None, noise=None)
    for _ in range(steps):
        x, st = run(one, model, states[-1])
        states.append(x)
        confs.append(st["confidence"])
    return torch.stack(states), torch.stack(confs)


@pytest.fixture(scope="module")
def chains():
    """A tiny model, 16 starts, their noise-free 8-step trajectories and a threshold that some chains cross at
    different steps while others never do."""
    model, init = tiny_cnn(), uniform_init(16)
    states, confs = trajectory(model, init, 8)
    return model, init, states, confs, float(confs[-1].median())


@pytest.mark.parametrize("compact_below", [1.0, 0.5, 0.0])
def test_per_chain_early_stop_freezes_each_chain(chains, compact_below):
    model, init, states, confs, thr = chains
    sampler = LangevinSampler(max_steps=8, early_stop="chain", confidence=thr, noise=None, compact_below=compact_below)
    x, st = run(sampler, model, init)
    steps = st["steps"]
    assert len(set(steps.tolist())) >= 3                  # chains stopped at different steps
    stopped = steps < 8
    assert stopped.any() and (~stopped).any()
    assert bool((st["confidence"][stopped] >= thr).all())
    for i in range(16):
        k = int(steps[i])
        # each chain is its own noise-free trajectory stopped after exactly k updates: a frozen chain is never
        # touched again, whatever compaction did to the batch ...
        assert torch.equal(x[i], states[k, i]), i
        # ... and k is the first state whose confidence reached the threshold
        assert bool((confs[:k, i] < thr).all()) and (k == 8 or confs[k, i] >= thr)
    # compacting forwards each chain once per state, plus at most one re-forward per update (when most rows of a
    # forward froze, the running ones are forwarded again alone); masking forwards the full batch every time
    if compact_below == 0.0:
        assert st["forwards"] == 16 * (int(steps.max()) + 1)
    else:
        assert int((steps + 1).sum()) <= st["forwards"] <= int((2 * steps + 1).sum())


def test_per_chain_early_stop_with_noise_counts_and_bounds(chains):
    model, init, _, _, thr = chains
    x, st = run(LangevinSampler(max_steps=8, confidence=thr, noise="authors", step_size=0.05), model, init)
    assert bool((x.abs() <= 1).all())
    done = st["steps"] < 8
    assert done.any() and bool((st["confidence"][done] >= thr).all())
    assert st["forwards"] < 16 * 9


def test_batch_rule_stops_all_chains_together(chains):
    model, init, states, confs, _ = chains
    means = confs.mean(1)
    assert bool((means[1:] > means[:-1]).all())     # the mean confidence rises along the trajectory here
    thr = float(means[3] + means[4]) / 2           # crossed between states 3 and 4
    x, st = run(LangevinSampler(max_steps=8, early_stop="batch", confidence=thr, noise=None), model, init)
    assert torch.equal(st["steps"], torch.full((16,), 4))
    assert torch.equal(x, states[4])
    assert float(st["confidence"].mean()) > thr
    assert st["forwards"] == 16 * 5


def test_no_early_stop_runs_max_steps():
    model = tiny_cnn()
    sampler = LangevinSampler(max_steps=5, early_stop=None, confidence=0.0)
    sampler.sample(model, 6, SHAPE)
    assert torch.equal(sampler.stats["steps"], torch.full((6,), 5))


def test_with_min_steps_0_already_confident_chains_take_no_step():
    model = tiny_cnn()
    x, st = run(LangevinSampler(max_steps=5, early_stop="chain", confidence=0.0, min_steps=0), model, uniform_init(6))
    assert torch.equal(st["steps"], torch.zeros(6, dtype=torch.long))
    assert torch.equal(x, uniform_init(6)) and st["forwards"] == 6
    assert torch.allclose(st["start_confidence"], st["confidence"])


@pytest.mark.parametrize("early_stop", ["chain", "batch"])
def test_default_updates_every_chain_once_before_the_stop_test(early_stop):
    # The authors' SamplerSGLD (Lawliet-zzl/FIG, code_FIG/model_func.py) updates the batch, then tests its mean
    # confidence: at least one update even when the uniform start is already confident. Testing the start first
    # returned the noise unchanged for 100% of chains on the demo's pretrained SmallCNN (issue 12).
    model = tiny_cnn()
    init = uniform_init(6)
    x, st = run(LangevinSampler(max_steps=5, early_stop=early_stop, confidence=0.0), model, init)
    assert torch.equal(st["steps"], torch.ones(6, dtype=torch.long))
    assert not torch.equal(x, init)
    assert float(st["start_confidence"].min()) > 0  # the starts' confidence is reported (before sampling)


@pytest.mark.parametrize("early_stop", ["chain", "batch"])
def test_min_steps_updates_before_any_stop_test(early_stop):
    x, st = run(LangevinSampler(max_steps=6, early_stop=early_stop, confidence=0.0, min_steps=3), tiny_cnn(),
                uniform_init(5))
    assert torch.equal(st["steps"], torch.full((5,), 3))
    # capped by max_steps
    x, st = run(LangevinSampler(max_steps=2, early_stop=early_stop, confidence=0.0, min_steps=3), tiny_cnn(),
                uniform_init(5))
    assert torch.equal(st["steps"], torch.full((5,), 2))


def test_defaults_follow_the_authors_code():
    s = LangevinSampler()
    # Lawliet-zzl/FIG code_FIG/model_func.py (SamplerSGLD): noise lr * randn (std eps, not sqrt(eps)); lr 0.1,
    # times 0.9 every 100 updates; T = 20; stop when the mean max-softmax > 0.9; c = 5 (outputs / 5); at least one
    # update before the test; samples clamped to [-1, 1].
    assert s.noise == "authors" and s.noise_std(0.1) == pytest.approx(0.1)
    assert (s.step_size, s.decay, s.decay_every, s.max_steps, s.confidence, s.c) == (0.1, 0.9, 100, 20, 0.9, 5.0)
    assert s.min_steps == 1
    assert (s.lower, s.upper) == ((-1.0,), (1.0,))


class _ScaledLinear(nn.Module):
    def __init__(self, seed=0, dim=36, classes=3, scale=0.2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, dim, generator=g) * scale)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def test_paper_noise_drowns_the_drift():
    # Variance-eps noise (std sqrt(0.1) = 0.32 per pixel) against a sign step of eps/2 = 0.05: the chains climb
    # the confidence much less than with the authors' std-eps noise (measured on the demo SmallCNN with its last
    # layer scaled by 0.1: 0.85 and 0% of chains at 0.9 vs 100% at 0.9 within 8 updates; docs/fidelity.md).
    model = _ScaledLinear()
    init = uniform_init(64)
    end = {}
    for noise in ("paper", "authors"):
        torch.manual_seed(0)
        _, st = run(LangevinSampler(max_steps=20, early_stop=None, noise=noise), model, init)
        end[noise] = float(st["confidence"].mean())
        start = float(st["start_confidence"].mean())
    assert start < 0.6
    assert end["authors"] > 0.9 and end["paper"] < end["authors"] - 0.1, end


# ------------------------------------------------------------------------------------------------ schedule, noise
class _Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        real = ops.langevin_step_

        def record(x, grad, step_size, noise_std, lower, upper, active=None):
            self.calls.append((step_size, noise_std))
            return real(x, grad, step_size, noise_std, lower, upper, active)

        monkeypatch.setattr(ops, "langevin_step_", record)


def test_step_size_decay_schedule(monkeypatch):
    sampler = LangevinSampler(step_size=0.2, decay=0.5, decay_every=3, max_steps=7, early_stop=None, noise="authors")
    assert [sampler.step_size_at(t) for t in range(7)] == pytest.approx([0.2] * 3 + [0.1] * 3 + [0.05])
    rec = _Recorder(monkeypatch)
    sampler.sample(tiny_cnn(), 4, SHAPE)
    assert [s for s, _ in rec.calls] == pytest.approx([0.2] * 3 + [0.1] * 3 + [0.05])
    assert [z for _, z in rec.calls] == pytest.approx([0.2] * 3 + [0.1] * 3 + [0.05])


@pytest.mark.parametrize("noise, expected", [("paper", math.sqrt(0.1)), ("authors", 0.1), (None, 0.0)])
def test_noise_std_paper_vs_authors(noise, expected, monkeypatch):
    sampler = LangevinSampler(step_size=0.1, max_steps=1, early_stop=None, noise=noise, bounds=(-100.0, 100.0))
    assert sampler.noise_std(0.1) == pytest.approx(expected)
    rec = _Recorder(monkeypatch)
    x, _ = run(sampler, InputFree(), torch.zeros(4000, 1, 2, 2), shape=(1, 2, 2))
    assert rec.calls == [(pytest.approx(0.1), pytest.approx(expected))]
    # the energy gradient is zero, so the one step is pure noise of that std
    assert float(x.std()) == pytest.approx(expected, rel=0.05, abs=1e-6)


# ------------------------------------------------------------------------------------------------ replay, init
def test_replay_buffer_reseeds_part_of_each_batch():
    model = tiny_cnn()
    sampler = LangevinSampler(max_steps=3, early_stop=None, replay_buffer=12, replay_fraction=0.5)
    first = sampler.sample(model, 8, SHAPE)
    assert sampler.stats["reused"] == 0 and torch.equal(sampler.buffer, first)
    second = sampler.sample(model, 8, SHAPE)
    assert sampler.stats["reused"] == 4
    assert sampler.buffer.shape == (12,) + SHAPE
    assert torch.equal(sampler.buffer, torch.cat([first, second])[-12:])
    # with no updates, the re-seeded chains are exactly earlier samples
    sampler.max_steps = 0
    buffer = sampler.buffer.clone()
    third = sampler.sample(model, 8, SHAPE)
    flat = buffer.flatten(1)
    for row in third[:4]:
        assert (flat == row.flatten()).all(1).any()
    for row in third[4:]:
        assert not (flat == row.flatten()).all(1).any()
    # state round trip
    clone = LangevinSampler(replay_buffer=12)
    clone.load_state_dict(sampler.state_dict())
    assert torch.equal(clone.buffer, sampler.buffer)


def test_explicit_init_bypasses_replay_and_init_pool():
    model = tiny_cnn()
    pool = uniform_init(5, seed=3)
    sampler = LangevinSampler(max_steps=0, init=pool, replay_buffer=4)
    x = sampler.sample(model, 10, SHAPE)
    for row in x:
        assert (pool.flatten(1) == row.flatten()).all(1).any()
    explicit = uniform_init(3, seed=9)
    y = sampler.sample(model, 3, SHAPE, init=explicit)
    assert torch.equal(y, explicit) and sampler.stats["reused"] == 0


def test_seeded_reproducibility():
    model = tiny_cnn()
    warm = LangevinSampler(max_steps=4, confidence=0.45)

    def draw(seed, sampler=None):
        sampler = sampler or LangevinSampler(max_steps=4, confidence=0.45)
        torch.manual_seed(seed)
        return sampler.sample(model, 8, SHAPE), sampler.stats["steps"]

    a, sa = draw(0)
    b, sb = draw(0)
    c, _ = draw(1)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)
    # a sampler that already built its folded view draws the same (building it consumes no random numbers)
    draw(5, warm)
    d, sd = draw(0, warm)
    assert torch.equal(a, d) and torch.equal(sa, sd)


@pytest.mark.skipif(not ops.native_available(), reason="native extension not built")
def test_native_and_reference_backends_agree_without_noise():
    model, init = tiny_cnn(), uniform_init(16)
    out = {}
    for backend in ("native", "reference"):
        with ops.use_backend(backend):
            out[backend] = run(LangevinSampler(max_steps=6, noise=None, confidence=0.45), model, init)
    (xn, sn), (xr, sr) = out["native"], out["reference"]
    assert torch.equal(xn, xr)
    assert torch.equal(sn["steps"], sr["steps"])
    torch.testing.assert_close(sn["energy"], sr["energy"])


def test_cuda_only_options_are_ignored_on_cpu():
    model, init = tiny_cnn(), uniform_init(8)
    torch.manual_seed(0)
    a, _ = run(LangevinSampler(max_steps=4), model, init)
    torch.manual_seed(0)
    b, st = run(LangevinSampler(max_steps=4, channels_last=True, cuda_graph=True), model, init)
    assert torch.equal(a, b) and a.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("early_stop", [None, "chain"])
def test_cuda_graph_matches_eager(device, early_stop):
    if device == "cpu":
        pytest.skip("CUDA graphs need a CUDA device")
    model, init = tiny_cnn().to(device), uniform_init(16).to(device)
    thr = float(trajectory(model, init, 6)[1][-1].median())
    kw = dict(max_steps=6, noise=None, early_stop=early_stop, confidence=thr)
    eager, se = run(LangevinSampler(**kw), model, init)
    sampler = LangevinSampler(cuda_graph=True, **kw)
    graphed, sg = run(sampler, model, init)
    again, _ = run(sampler, model, init)                   # replays the cached graph
    torch.testing.assert_close(graphed, eager)
    assert torch.equal(graphed, again) and torch.equal(sg["steps"], se["steps"])
    fast = LangevinSampler(max_steps=3, channels_last=True, precision="bf16", cuda_graph=True)
    x = fast.sample(model, 8, SHAPE)
    assert bool((x.abs() <= 1).all()) and fast.stats["steps"].shape == (8,)


# ------------------------------------------------------------------------------------------------ BatchNorm folding
def _randomize_batchnorm(model):
    torch.manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
    return model


def test_folded_batchnorm_computes_the_same_chains():
    model, init = _randomize_batchnorm(tiny_cnn()), uniform_init(16)
    out = {}
    for fold in (True, False):
        sampler = LangevinSampler(max_steps=0, fold_batchnorm=fold, precision="fp32")
        _, st0 = run(sampler, model, init)
        sampler.max_steps = 4
        sampler.noise = None
        x, st = run(sampler, model, init)
        out[fold] = (st0, x, st)
    (f0, fx, fs), (u0, ux, us) = out[True], out[False]
    assert fs["folded"] == 1 and us["folded"] == 0
    torch.testing.assert_close(f0["energy"], u0["energy"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f0["confidence"], u0["confidence"], rtol=1e-4, atol=1e-6)
    # sign gradients agree except where a component is within rounding of zero
    assert float((fx == ux).float().mean()) > 0.99


def test_folded_view_follows_weight_updates_in_place():
    model, init = _randomize_batchnorm(tiny_cnn()), uniform_init(8)
    sampler = LangevinSampler(max_steps=0, precision="fp32")  # the folding compared at float32 tolerance
    run(sampler, model, init)
    with torch.no_grad():                    # what an optimizer step and a train-mode forward do
        model[0].weight.mul_(-1.5)
        model[1].running_mean.add_(0.3)
        model[-1].bias.add_(2.0)
    _, st = run(sampler, model, init)
    assert st["folded"] == 1
    with torch.no_grad():
        logits = model.eval()(init)
    torch.testing.assert_close(st["energy"], ops.reference.modified_energy(logits), rtol=1e-4, atol=1e-5)


def test_folded_view_is_rebuilt_when_the_model_changes_dtype():
    model, init = _randomize_batchnorm(tiny_cnn()), uniform_init(8)
    sampler = LangevinSampler(max_steps=0)
    run(sampler, model, init)
    model.double()  # same modules (ids unchanged), new weights in float64
    _, st = run(sampler, model, init.double())
    assert st["folded"] == 1
    with torch.no_grad():
        logits = model.eval()(init.double())
    torch.testing.assert_close(st["energy"].double(), ops.reference.modified_energy(logits), rtol=1e-5, atol=1e-5)


class SkipAroundBN(nn.Module):
    """The convolution's output also feeds a skip connection: folding the BN into it would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1), nn.Linear(36, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).flatten(1))


class DataDependent(nn.Module):
    """fx cannot trace a branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


def batch_statistics_bn():
    """BatchNorm without running statistics normalizes with the batch's even in eval mode: nothing to fold."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                         nn.Linear(32, 3))


@pytest.mark.parametrize("make", [SkipAroundBN, DataDependent, batch_statistics_bn])
def test_models_that_cannot_be_folded_run_as_they_are(make):
    torch.manual_seed(0)
    model = make()
    if not isinstance(model, nn.Sequential):
        _randomize_batchnorm(model)
    init = uniform_init(6)
    a, sa = run(LangevinSampler(max_steps=3, noise=None), model, init)
    b, sb = run(LangevinSampler(max_steps=3, noise=None, fold_batchnorm=False), model, init)
    assert sa["folded"] == 0 and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"early_stop": "never"}, ValueError, "early_stop"),
    ({"noise": "pink"}, ValueError, "noise"),
    ({"step_size": 0}, ValueError, "step_size"),
    ({"c": float("nan")}, ValueError, "c must"),
    ({"max_steps": 2.5}, TypeError, "max_steps"),
    ({"max_steps": -1}, ValueError, "max_steps"),
    ({"confidence": 1.5}, ValueError, "confidence"),
    ({"bounds": (1.0, -1.0)}, ValueError, "lower <= upper"),
    ({"bounds": (-1.0,)}, ValueError, "pair"),
    ({"bounds": ([0, 0], [1, 1, 1])}, ValueError, "per channel"),
    ({"init": "gaussian"}, ValueError, "init"),
    ({"replay_fraction": 2.0}, ValueError, "replay_fraction"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LangevinSampler(**kwargs)


def test_bad_sample_arguments():
    model, sampler = tiny_cnn(), LangevinSampler(max_steps=1)
    with pytest.raises(TypeError, match="model"):
        sampler.sample(lambda x: x, 2, SHAPE)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sampler.sample(model, -1, SHAPE)
    with pytest.raises(TypeError, match="n must be an int"):
        sampler.sample(model, 2.0, SHAPE)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(model, 2, (1, 0, 6))
    with pytest.raises(ValueError, match="init must have shape"):
        sampler.sample(model, 2, SHAPE, init=torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(model, 1, SHAPE, init=torch.full((1,) + SHAPE, float("nan")))
    with pytest.raises(ValueError, match="channels"):
        LangevinSampler(bounds=([0, 0], [1, 1])).sample(model, 2, SHAPE)
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(nn.Sequential(nn.Flatten(0)), 2, SHAPE)


# ------------------------------------------------------------------------------------------------ noise samplers
def test_gaussian_and_uniform_noise_samplers():
    torch.manual_seed(0)
    g = GaussianNoiseSampler(std=0.3, mean=0.1, bounds=(-0.5, 0.5))
    x = g.sample(None, 2000, (1, 4, 4))
    assert x.shape == (2000, 1, 4, 4) and float(x.min()) >= -0.5 and float(x.max()) <= 0.5
    assert float(x.mean()) == pytest.approx(0.1, abs=0.02)
    model = tiny_cnn()
    torch.manual_seed(0)
    assert torch.equal(g.sample(model, 2000, (1, 4, 4)), x)     # seeded, model ignored
    u = UniformNoiseSampler(bounds=([-1.0, 0.0], [0.0, 1.0])).sample(None, 500, (2, 3, 3))
    assert float(u[:, 0].max()) <= 0 and float(u[:, 1].min()) >= 0 and float(u[:, 1].max()) > 0.9
    with pytest.raises(ValueError, match="std"):
        GaussianNoiseSampler(std=0)
    with pytest.raises(ValueError, match="n must"):
        g.sample(None, -2, (1, 2, 2))
