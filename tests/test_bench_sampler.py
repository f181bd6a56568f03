"""bench/bench_sampler.py: the authors' loop takes input gradients only (as the FIG authors' code), the work per
image is counted with torch.utils.flop_counter, and the GPU-check switches are validated."""
import os
import subprocess
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_sampler  # noqa: E402


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_authors_loop_computes_no_parameter_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    calls = []
    for p in model.parameters():
        p.register_hook(lambda g: calls.append(g.shape))  # fires whenever autograd computes a parameter's grad
    x, taken, confidence = bench_sampler.authors_loop(model, 4, (1, 6, 6), steps=3, batch_stop=False,
                                                      device=torch.device("cpu"))
    assert taken == 3 and x.shape == (4, 1, 6, 6) and confidence.shape == (4,)
    assert calls == [], "the authors' loop must differentiate w.r.t. the input only"
    assert all(p.grad is None for p in model.parameters())


def test_flops_per_image_are_forward_and_input_backward():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 5, bias=False))
    forward, backward = bench_sampler.model_flops_per_image(model, (10,), torch.device("cpu"))
    assert forward == 2 * 10 * 5      # one matrix-vector product per image
    assert backward == 2 * 10 * 5     # grad of the input only (no weight gradient)


def test_native_variant_names_its_configuration():
    assert bench_sampler.native_variant_name("bf16", True, True) == "fastood-native[bf16,graph,channels_last]"
    assert bench_sampler.native_variant_name("fp32", False, False) == "fastood-native[fp32,no-graph]"


def test_cuda_only_switches_are_refused_on_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_sampler.py"), "--device", "cpu",
                           "--quick", "--dtype", "bf16", "--cuda-graphs", "on"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "configure the CUDA sampler" in proc.stderr


def test_native_rows_per_precision_and_their_names():
    impls = bench_sampler.implementations(torch.device("cpu"), 2, None, precisions=("fp32", "bf16", "auto"))
    native = [k for k in impls if k.startswith("fastood-native")]
    assert native == ["fastood-native", "fastood-native[bf16]", "fastood-native[auto]"]
    assert [bench_sampler.requested_precision(k) for k in native] == ["fp32", "bf16", "auto"]
    assert bench_sampler.requested_precision("authors-loop") == "fp32"
    assert bench_sampler.requested_precision("fastood-native[fp16,graph,channels_last]") == "fp16"
    if impls["fastood-native[bf16]"] is not None:
        assert impls["fastood-native[bf16]"].sampler.precision == "bf16"


def test_peak_memory_sees_a_large_temporary():
    cpu = torch.device("cpu")
    big, basis = bench_sampler.peak_memory(lambda: torch.ones(25_000_000).sum(), cpu)   # 100 MB
    assert big >= 80 or basis.startswith("process max rss"), (big, basis)


def test_peak_memory_sees_a_repeated_call_that_reuses_freed_heap():
    """Small tensors come from the C heap, whose freed pages stay resident: a second identical call measured ~0 MiB
    (the 0.0 MiB rows of bench_sampler) until the heap is trimmed before the baseline."""
    cpu = torch.device("cpu")
    # freeing a few 8 MB tensors raises glibc's dynamic mmap / trim thresholds, as a sampler's batches do: from then
    # on 64 KB tensors live on the heap and their freed pages are kept
    bench_sampler.peak_memory(lambda: [torch.ones(2_000_000) for _ in range(4)], cpu)
    many = lambda: [torch.ones(16_000) for _ in range(3000)]                   # noqa: E731  3000 x 64 KB = 192 MB
    for _ in range(3):
        again, basis = bench_sampler.peak_memory(many, cpu)
        assert again >= 150 or basis.startswith("process max rss"), (again, basis)


def test_grid_is_refused_on_cpu_and_builds_one_row_per_combination():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_sampler.py"), "--device", "cpu",
                           "--quick", "--grid"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "CUDA only" in proc.stderr
    grid = [(p, g, cl) for p in ("fp32", "bf16") for g in (True, False) for cl in (True, False)]
    impls = bench_sampler.implementations(torch.device("cpu"), 2, None, variant=grid)
    names = [k for k in impls if k.startswith("fastood-native")]
    assert len(names) == 8 and "fastood-native[bf16,graph,channels_last]" in names
    assert "fastood-native[fp32,no-graph]" in names
