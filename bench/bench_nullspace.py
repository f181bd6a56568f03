"""Type-I outliers per second (Vernekar et al. 2019): decoder Jacobian + null-space projection.

    python bench/bench_nullspace.py [--device cpu|cuda] [--json PATH] [--quick]

Two sizes: MNIST (1x28x28, D = 784, latent d = 8, the mnist5k CVAE of bench/quality_cvae.py) and CIFAR
(3x32x32, D = 3072, d = 32). Rows:

- ``type I (encode + J + project)``: ``ManifoldSampler.type1`` end to end: encoder means, the decoder Jacobian by
  forward mode (d JVPs vmapped over the batch), ``fastood.ops.nullspace_project``, the step and the clip.
- ``Jacobian, forward mode``: the d JVPs alone; ``Jacobian, reverse mode``: ``torch.func.jacrev`` (D vector-Jacobian
  products, what forward mode avoids), MNIST only.
- projection alone on random J [B, D, d] and r [B, D]: the fused op (native backend), the QR reference
  (``fastood.ops.reference.nullspace_project``), and the authors' approach, an explicit basis of the null space per
  sample (here batched ``torch.linalg.svd`` with the full U, ``N`` = its last D - d columns,
  ``v = N N^T r / |N N^T r|``; the authors used sympy).

Rates are samples per second (median of timed repetitions). Targets on a 2-core CPU: >= 1,000 type-I outliers/s at
D = 784, d = 8, and the fused projection >= 50x faster than the explicit basis.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import fastood.ops as ops  # noqa: E402
from fastood.models.cvae import ConditionalVAE  # noqa: E402
from fastood.ops import reference  # noqa: E402
from fastood.samplers.manifold import ManifoldSampler, decoder_jacobian  # noqa: E402

from _common import add_common_args, environment, median_seconds, print_table, resolve_device, write_json  # noqa: E402

#: (name, image shape, CVAE keyword arguments). MNIST matches bench/quality_cvae.py's MNIST_CVAE.
SIZES = [("MNIST", (1, 28, 28), dict(latent_dim=8, width=16, hidden=128)),
         ("CIFAR", (3, 32, 32), dict(latent_dim=32, width=32, hidden=256))]


def explicit_basis_project(jac, r):
    """The authors' construction: an explicit orthonormal basis N [D, D - d] of each J's left null space (full SVD),
    then ``v = N N^T r`` normalized. jac [B, D, d], r [B, D] -> [B, D]."""
    u, _, _ = torch.linalg.svd(jac, full_matrices=True)
    basis = u[:, :, jac.shape[2]:]
    v = (basis @ (basis.transpose(1, 2) @ r.unsqueeze(2))).squeeze(2)
    return v / v.norm(dim=1, keepdim=True)


def time_rate(fn, n, device, repeats):
    seconds = median_seconds(fn, device, warmup=1, repeats=repeats, min_time=0.5 if repeats > 1 else 0.0)
    return seconds, n / seconds


def bench_size(name, shape, cvae_kwargs, device, quick):
    c, h, _ = shape
    d_lat, d_out = cvae_kwargs["latent_dim"], c * h * h
    batch = (32 if quick else 256) if name == "MNIST" else (8 if quick else 64)
    explicit_batch = 4 if quick else (64 if name == "MNIST" else 8)
    repeats = 1 if quick else 5
    torch.manual_seed(0)
    cvae = ConditionalVAE(c, h, num_classes=10, **cvae_kwargs).to(device).eval()
    sampler = ManifoldSampler(cvae, batch_size=batch)
    x = torch.rand(batch, *shape, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    cond = cvae.class_vectors(y).detach()
    with torch.no_grad():
        z = cvae.encode(x, cond)[0]
    params = sum(p.numel() for part in (cvae.decoder_fc, cvae.decoder_conv) for p in part.parameters())
    rows = []

    def row(what, backend, n, fn, reps=repeats):
        seconds, rate = time_rate(fn, n, device, reps)
        rows.append({"size": name, "D": d_out, "d": d_lat, "what": what, "backend": backend, "batch": n,
                     "ms_per_batch": 1e3 * seconds, "samples_per_s": rate})
        return rate

    native = ops.native_available() and (device.type == "cpu" or ops.cuda_kernels_available())
    op_backend = "native" if native else "reference"
    with ops.use_backend(op_backend):
        row("type I (encode + J + project)", op_backend, batch, lambda: sampler.type1(x, y))
    with torch.no_grad():
        row("Jacobian, forward mode (d JVPs)", "torch.func", batch, lambda: decoder_jacobian(cvae, z, cond))
        if name == "MNIST":
            small = 8 if quick else 32

            def jacrev():
                f = lambda zz: cvae.decode(zz.unsqueeze(0), cond[:1]).flatten()  # noqa: E731
                return torch.func.vmap(torch.func.jacrev(f))(z[:small])

            row("Jacobian, reverse mode (D VJPs)", "torch.func", small, jacrev)

    jac = torch.randn(batch, d_out, d_lat, device=device)
    r = torch.randn(batch, d_out, device=device)
    if native:
        with ops.use_backend("native"):
            row("projection: fused op", "native", batch, lambda: ops.nullspace_project(jac, r))
    row("projection: QR reference", "reference", batch, lambda: reference.nullspace_project(jac, r))
    eb = min(explicit_batch, batch)
    row("projection: explicit SVD basis", "torch.linalg.svd", eb,
        lambda: explicit_basis_project(jac[:eb], r[:eb]), reps=max(1, min(repeats, 3)))
    explicit = rows[-1]["samples_per_s"]
    for rw in rows:
        rw["decoder_params"] = params
        rw["x_vs_explicit"] = rw["samples_per_s"] / explicit if rw["what"].startswith("projection") else None
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, shape, cvae_kwargs in SIZES:
        rows += bench_size(name, shape, cvae_kwargs, device, args.quick)
    print_table(rows, [("size", "size", "s"), ("D", "D", "d"), ("d", "d", "d"), ("what", "what", "s"),
                       ("backend", "backend", "s"), ("batch", "batch", "d"), ("ms_per_batch", "ms/batch", ".2f"),
                       ("samples_per_s", "samples/s", ".0f"), ("x_vs_explicit", "x explicit", ".1f")],
                title=f"type-I outliers on {device} ({torch.get_num_threads()} threads)")
    write_json(args.json, rows, environment(device, benchmark="nullspace"))
    return rows


if __name__ == "__main__":
    main()
