"""DRF's batched flows vs the per-class loop they replaced (CPU, float64): scoring images/s (plain and with the
input gradient of input perturbation) and flow-fitting time, measured round-robin in one process so that the
ratios survive a shared machine. Also the torch.func.vmap alternative for scoring.

    PYTHONPATH=$PWD nice python bench/drf_batched_speed.py [--dims 64 128] [--per-class 512] [--rounds 3] [--threads 1]
"""
import argparse
import copy
import math
import time

import torch
from torch import nn

from fastood.detectors import DRF
from fastood.detectors.residual_flow import ResidualFlow


def log_normal(flow, u):
    z, logdet = flow(u)
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) + logdet


def loop_scores(det, f):                                    # the old _layer_log_likelihood
    return torch.stack([log_normal(flow, (f - det.means[0][k]) @ det.whiten[0].T)
                        for k, flow in enumerate(det.flows[0])], 1) + det.log_det_whiten[0]


def vmap_scores(det, f, state):
    params, buffers = state
    base = det.flows[0][0]
    u = (f[None] - det.means[0][:, None]) @ det.whiten[0].T

    def one(p, b, x):
        return log_normal(lambda v: torch.func.functional_call(base, (p, b), (v,)), x)

    return torch.func.vmap(one)(params, buffers, u).T + det.log_det_whiten[0]


def loop_fit(det, flows, us, seeds):                         # the old _train_flow, class after class
    lls = []
    for flow, u, seed in zip(flows, us, seeds):
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(flow.parameters(), lr=det.lr)
        for _ in range(det.epochs):
            order = torch.randperm(u.shape[0], generator=generator)
            for start in range(0, u.shape[0], det.batch_size):
                loss = -log_normal(flow, u[order[start:start + det.batch_size]]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            lls.append(log_normal(flow, u))
    return torch.cat(lls)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--couplings", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=512, help="training features per class for the fit")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy machine, 2 threads ran 20-30x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={args.classes}, batch {args.batch}, "
          f"couplings {args.couplings}, fit: {args.per_class} per class, {args.epochs} epoch(s)")
    for d in args.dims:
        k = args.classes
        y = torch.arange(k * args.per_class) % k
        x = torch.randn(k, d, dtype=torch.float64)[y] + torch.randn(len(y), d, dtype=torch.float64)
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, k)).double()
        det = DRF(model, couplings=args.couplings, epochs=0, seed=0).fit([(x, y)])
        det.epochs = args.epochs
        with torch.no_grad():                                # away from the identity (timing only)
            for p in det.flows[0].parameters():
                p.add_(0.01 * torch.randn_like(p))
        f = torch.randn(args.batch, d, dtype=torch.float64)
        state = torch.func.stack_module_state(list(det.flows[0]))
        err = (det.log_likelihoods([f])[0] - loop_scores(det, f)).abs().max() / loop_scores(det, f).abs().max()
        err_v = (vmap_scores(det, f, state) - loop_scores(det, f)).abs().max() / loop_scores(det, f).abs().max()

        def with_grad(score):
            def run():
                fg = f.clone().requires_grad_()
                torch.autograd.grad(score(fg).amax(1).sum(), fg)
            return run

        with torch.no_grad():
            plain = {"loop": lambda: loop_scores(det, f), "batched": lambda: det.log_likelihoods([f])[0],
                     "vmap": lambda: vmap_scores(det, f, state)}
        grad = {"loop": with_grad(lambda v: loop_scores(det, v)),
                "batched": with_grad(lambda v: det.log_likelihoods([v])[0]),
                "vmap": with_grad(lambda v: vmap_scores(det, v, state))}
        u_all = (x - det.means[0][y]) @ det.whiten[0].T
        us, seeds = [u_all[y == c] for c in range(k)], [1000 + c for c in range(k)]
        initial = copy.deepcopy(det.flows[0])

        def fit_batched():
            det.flows[0] = copy.deepcopy(initial)
            det._train_flows(0, us, seeds)

        def fit_loop():
            flows = copy.deepcopy(initial).requires_grad_(True)
            with torch.enable_grad():
                loop_fit(det, flows, us, seeds)

        times = {}
        for _ in range(args.rounds):
            for name, fn in plain.items():
                with torch.no_grad():
                    times.setdefault(("score", name), []).append(timed(fn))
            for name, fn in grad.items():
                times.setdefault(("score+grad", name), []).append(timed(fn))
            for name, fn in (("loop", fit_loop), ("batched", fit_batched)):
                times.setdefault(("fit", name), []).append(timed(fn))
        print(f"\nF = H = {d}: batched vs loop max rel. diff {err:.1e}, vmap vs loop {err_v:.1e}")
        for what in ("score", "score+grad", "fit"):
            best = {name: min(t) for (w, name), t in times.items() if w == what}
            unit = (lambda s: f"{s:.2f} s") if what == "fit" else (lambda s: f"{args.batch / s:.0f} img/s")
            print(f"  {what:11s} " + ", ".join(f"{n} {unit(s)}" for n, s in best.items())
                  + f"; loop/batched time ratio {best['loop'] / best['batched']:.2f}"
                  + (f", loop/vmap {best['loop'] / best['vmap']:.2f}" if "vmap" in best else ""))


if __name__ == "__main__":
    main()
