"""LangevinSampler(precision=...): the choice of "auto" and its fallbacks, one rule on CPU and CUDA (the sampler's
precision wins over a surrounding autocast), float32 energy/confidence, and the deprecated autocast_bf16 alias."""
import warnings

import pytest
import torch
from torch import nn

from fastood.samplers import precision as P
from fastood.samplers.langevin import LangevinSampler

from conftest import DEVICES

SHAPE = (1, 6, 6)


class Recorder(nn.Module):
    """Conv-ReLU-Linear that records the dtype its linear layer computed in, on every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 3)
        self.seen = []

    def forward(self, x):
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        if isinstance(out, torch.Tensor):  # not the fx tracing proxy
            self.seen.append(out.dtype)
        return out


def init(n=8, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.rand((n,) + SHAPE, generator=g) * 2 - 1).to(device)


def sample(sampler, model, device="cpu", n=8):
    return sampler.sample(model, n, SHAPE, init=init(n, device))


# ------------------------------------------------------------------------------------------------ resolution
def test_auto_is_bf16_by_default_where_native_since_the_quality_ab(monkeypatch):
    """The A/B (docs/fidelity.md) passed, so "auto" picks bfloat16 on a native device without any switch."""
    assert P.AUTO_USES_BF16 is True
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (True, "test: native"))
    dtype, info = P.resolve("auto", "cpu")
    assert dtype is torch.bfloat16 and info["precision"] == "bf16" and info["bf16_native"] is True


def test_auto_can_be_kept_fp32_everywhere(monkeypatch):
    monkeypatch.setattr(P, "AUTO_USES_BF16", False)
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (True, "test: native"))
    dtype, info = P.resolve("auto", "cpu")
    assert dtype is None and info["precision"] == "fp32" and info["bf16_native"] is True
    assert "AUTO_USES_BF16 = False" in info["why"]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_native_once_validated(monkeypatch, native, expected):
    monkeypatch.setattr(P, "AUTO_USES_BF16", True)
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (native, "test"))
    dtype, info = P.resolve("auto", "cpu")
    assert info["precision"] == expected and dtype == {"bf16": torch.bfloat16, "fp32": None}[expected]


@pytest.mark.parametrize("name, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_precisions_are_honoured_native_or_not(monkeypatch, name, dtype):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (False, "test: emulated"))
    got, info = P.resolve(name, "cpu")
    assert got == dtype and info["precision"] == name and info["bf16_native"] is False


def _clear(monkeypatch):
    P.cpu_bf16_native.cache_clear()
    monkeypatch.delenv("FASTOOD_CPU_BF16", raising=False)


@pytest.mark.parametrize("capability, avx512_bf16, amx, native", [
    ("AVX512", True, False, True), ("AVX512", False, True, True), ("AVX512", False, False, False),
    ("AVX2", True, True, False),       # a forced AVX2 build (ATEN_CPU_CAPABILITY=avx2) is not native bf16
    ("DEFAULT", True, True, False)])
def test_cpu_detection_from_torch_probes(monkeypatch, capability, avx512_bf16, amx, native):
    _clear(monkeypatch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    try:
        got, why = P.cpu_bf16_native()
        assert got is native and capability in why
    finally:
        P.cpu_bf16_native.cache_clear()


@pytest.mark.parametrize("flags, native", [({"avx512f", "avx512_bf16"}, True), ({"avx512f", "amx_bf16"}, True),
                                           ({"avx512f", "avx2"}, False)])
def test_cpu_detection_falls_back_to_cpuinfo_flags(monkeypatch, flags, native):
    _clear(monkeypatch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: flags)
    try:
        assert P.cpu_bf16_native()[0] is native
    finally:
        P.cpu_bf16_native.cache_clear()


@pytest.mark.parametrize("value, native", [("0", False), ("1", True)])
def test_environment_override(monkeypatch, value, native):
    P.cpu_bf16_native.cache_clear()
    monkeypatch.setenv("FASTOOD_CPU_BF16", value)
    try:
        assert P.cpu_bf16_native() == (native, f"FASTOOD_CPU_BF16={value}")
    finally:
        P.cpu_bf16_native.cache_clear()


def test_cuda_needs_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert P.cuda_bf16_native("cuda")[0] is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert P.cuda_bf16_native("cuda") == (True, "CUDA compute capability 8.0")


# ------------------------------------------------------------------------------------------------ the sampler
@pytest.mark.parametrize("bad", ["bf32", "float32", None, 16])
def test_bad_precision_is_refused(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        LangevinSampler(precision=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                         ("fp16", torch.float16)])
def test_the_forward_runs_in_the_requested_precision(device, name, dtype):
    model = Recorder().to(device)
    sampler = LangevinSampler(max_steps=3, early_stop=None, precision=name)
    x = sample(sampler, model, device)
    assert set(model.seen) == {dtype}
    assert sampler.stats["precision"] == name and x.dtype == torch.float32
    assert bool((x.abs() <= 1).all()) and sampler.stats["steps"].tolist() == [3] * 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_surrounding_autocast_does_not_change_the_samplers_precision(device, name, dtype):
    """The old sampler inherited a CPU autocast (fp32 ran bf16 inside a trainer's CPU AMP) but overrode a CUDA
    one: now the sampler's own precision decides on both."""
    model = Recorder().to(device)
    sampler = LangevinSampler(max_steps=2, early_stop=None, precision=name)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        sample(sampler, model, device)
    assert set(model.seen) == {dtype}


@pytest.mark.parametrize("device", DEVICES)
def test_auto_follows_the_resolution(device, monkeypatch):
    monkeypatch.setattr(P, "AUTO_USES_BF16", True)
    monkeypatch.setattr(P, "bf16_native", lambda dev: (True, "test"))
    model = Recorder().to(device)
    sampler = LangevinSampler(max_steps=1)
    sample(sampler, model, device)
    assert set(model.seen) == {torch.bfloat16} and sampler.stats["precision"] == "bf16"
    assert sampler.stats["bf16_native"] is True
    monkeypatch.setattr(P, "bf16_native", lambda dev: (False, "test"))
    model.seen.clear()
    sample(sampler, model, device)
    assert set(model.seen) == {torch.float32} and sampler.stats["precision"] == "fp32"


def test_default_auto_is_float32_where_bf16_is_not_native(monkeypatch):
    monkeypatch.setattr(P, "bf16_native", lambda dev: (False, "test: AVX2 only"))
    model = Recorder()
    sampler = LangevinSampler(max_steps=1)
    sample(sampler, model)
    assert sampler.precision == "auto" and set(model.seen) == {torch.float32}
    assert sampler.stats["precision"] == "fp32"


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_energy_and_confidence_are_float32_of_the_low_precision_logits(name):
    """The stop rule's numbers come from the logits cast to float: float32 values that are not all bf16/fp16
    representable (an energy computed in the 16-bit type would be), equal to the float32 energy of those logits."""
    from fastood import ops

    model = Recorder()
    x0 = init()
    sampler = LangevinSampler(max_steps=0, precision=name, fold_batchnorm=False)
    sampler.sample(model, 8, SHAPE, init=x0)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    with torch.no_grad(), torch.autocast("cpu", dtype=half):
        logits = model(x0)
    want_e = ops.modified_energy(logits.float(), sampler.c)
    want_c = torch.softmax(logits.float(), dim=1).amax(dim=1)
    e, c = sampler.stats["energy"], sampler.stats["confidence"]
    assert e.dtype == torch.float32 and c.dtype == torch.float32
    torch.testing.assert_close(e, want_e)
    torch.testing.assert_close(c, want_c)
    assert bool((e.to(half).float() != e).any())


def test_fp16_gradient_scaling_keeps_the_signs():
    """fp16 scales each chain's energy gradient to a maximum of 1 before the backward: the same signs as the
    float32 update where fp16 does not round a gradient to 0 -- the chains move as in float32 up to rounding."""
    model = Recorder()
    ref = LangevinSampler(max_steps=1, early_stop=None, noise=None, precision="fp32")
    low = LangevinSampler(max_steps=1, early_stop=None, noise=None, precision="fp16")
    a, b = sample(ref, model), sample(low, model)
    assert (a != b).float().mean() < 0.1   # the same sign steps on >= 90% of the coordinates


def test_autocast_bf16_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="precision='bf16'"):
        s = LangevinSampler(autocast_bf16=True)
    assert s.precision == "bf16" and s.autocast_bf16 is True
    with pytest.warns(DeprecationWarning, match="precision='fp32'"):
        assert LangevinSampler(autocast_bf16=False).precision == "fp32"
    with pytest.warns(DeprecationWarning):
        assert LangevinSampler(autocast_bf16=True, precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="contradicts precision"):
        LangevinSampler(autocast_bf16=True, precision="fp32")
    with pytest.raises(TypeError, match="autocast_bf16 must be None or a bool"):
        LangevinSampler(autocast_bf16="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LangevinSampler(precision="bf16")   # no warning without the alias


def test_alias_warning_points_at_the_caller():
    with pytest.warns(DeprecationWarning) as record:
        LangevinSampler(autocast_bf16=True)
    assert record[0].filename == __file__
