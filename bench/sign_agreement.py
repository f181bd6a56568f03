"""Does the sign of the input gradient survive bfloat16 / float16? Measured along real FIG sampler runs.

    python bench/sign_agreement.py [--device cpu|cuda] [--json PATH] [--quick] [--cache DIR] [--chains 256]
                                   [--seeds 3] [--precisions bf16 fp16] [--pretrain-epochs 6]

FIG's Langevin update (Algorithm 1) uses only ``sign(grad_x E(x))``, so a forward and input backward in a 16-bit
type is harmless exactly when it leaves those signs alone. This bench runs :class:`LangevinSampler` in float32 on a
trained model (the SmallCNN that ``bench/quality_fig.py`` fine-tunes: ``fastood.pretrain.pretrained_small_cnn``,
mnist5k digits 0-4) and, at *every* update, also computes the gradient of the same chains at the same point under
``torch.autocast(dtype)`` through the same (BatchNorm-folded) network. Per update it compares the signs:

- ``agree``: fraction of all input coordinates whose sign matches float32's;
- ``agree |g|>median``: the same over the coordinates whose float32 |gradient| is above the median of their chain
  (the coordinates the update moves most decisively);
- ``zero``: fraction of coordinates whose low-precision gradient is exactly 0 (no move) while float32's is not.

Scenarios: ``FIG defaults`` (the sampler as FIGTrainer runs it: per-chain stop at confidence 0.9, at least one
update, at most 20) and ``20 steps`` (no early stop: the chains walk deep into the model's confident region, where
gradients are small). The table gives the mean over every update of every chain (weighted by coordinates), the
worst update, and a whole-run comparison: the same seed sampled entirely in float32 and entirely in the low
precision (mean updates per chain, final confidence and energy). ``--json`` writes the rows and the per-update
series.

``--quick``: an untrained narrow SmallCNN, 16 chains, 1 seed (a smoke test, not a measurement).
"""
import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import add_common_args, environment, print_table, resolve_device, write_json  # noqa: E402

from fastood.models import SmallCNN  # noqa: E402
from fastood.samplers import precision as precision_mod  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCENARIOS = {"FIG defaults": {}, "20 steps": {"early_stop": None, "max_steps": 20}}


class ComparingSampler(LangevinSampler):
    """A float32 LangevinSampler that, at every update, also takes the input gradient of the same chains under
    autocast(``dtypes``) and records how its signs compare with float32's (the trajectory stays float32's)."""

    def __init__(self, dtypes, **kwargs):
        super().__init__(precision="fp32", **kwargs)
        self.compare_dtypes = dtypes
        self.records = {name: [] for name in dtypes}

    def _evaluate(self, model, x, cuda, need_grad):
        energy, confidence, finite, grad_fn = super()._evaluate(model, x, cuda, need_grad)
        if not need_grad:
            return energy, confidence, finite, grad_fn
        g32 = grad_fn()
        for name, dtype in self.compare_dtypes.items():
            self.records[name].append(compare_signs(g32, low_precision_grad(model, x, dtype, self.c)))
        return energy, confidence, finite, lambda: g32


def low_precision_grad(model, x, dtype, c):
    """dE/dx of the chains x under autocast(dtype), the energy from the float logits (as the sampler does)."""
    from fastood import ops

    with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype):
        x_in = x.detach().requires_grad_(True)
        logits = model(x_in)
    _, d_energy = ops.modified_energy_grad(logits.detach().float(), c)
    if dtype == torch.float16:  # the sampler's per-chain scaling (positive: signs unchanged)
        d_energy = d_energy / d_energy.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=d_energy.to(logits.dtype))
    return grad.float()


def compare_signs(g32, glow):
    """Sign agreement of one update: dict of coordinate counts (summed later) for all coordinates and for those
    above their chain's median |g32|."""
    g32, glow = g32.flatten(1).float(), glow.flatten(1).float()
    same = torch.sign(g32) == torch.sign(glow)
    mag = g32.abs()
    big = mag > mag.median(dim=1, keepdim=True).values
    zero = (glow == 0) & (g32 != 0)
    return {"coords": same.numel(), "agree": int(same.sum()), "big": int(big.sum()),
            "agree_big": int((same & big).sum()),
            "zero": int(zero.sum()), "chains": g32.shape[0]}


def summarize(records):
    total = {k: sum(r[k] for r in records) for k in ("coords", "agree", "big", "agree_big", "zero")}
    per_update = [r["agree"] / r["coords"] for r in records]
    per_update_big = [r["agree_big"] / max(r["big"], 1) for r in records]
    return {"updates": len(records), "chain_updates": sum(r["chains"] for r in records),
            "agree": total["agree"] / max(total["coords"], 1),
            "agree_above_median": total["agree_big"] / max(total["big"], 1),
            "zero": total["zero"] / max(total["coords"], 1),
            "worst_update_agree": min(per_update) if per_update else None,
            "worst_update_agree_above_median": min(per_update_big) if per_update_big else None,
            "series": per_update, "series_above_median": per_update_big}


def whole_run(model, n, shape, precision, seed, device, **kwargs):
    torch.manual_seed(seed)
    sampler = LangevinSampler(precision=precision, **kwargs)
    sampler.sample(model, n, shape)
    st = sampler.stats
    return {"mean_steps": float(st["steps"].float().mean()), "confidence": float(st["confidence"].mean()),
            "energy": float(st["energy"].mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cache", help="directory of the cached pretrained SmallCNN (default: ~/.cache/fastood)")
    parser.add_argument("--chains", type=int, default=256, help="chains per sampling call (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"],
                        help="low precisions compared with float32 (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=int, default=6,
                        help="epochs of the pretrained SmallCNN (default: %(default)s, quality_fig's model)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chains < 1 or args.seeds < 1:
        parser.error(f"need --chains >= 1 and --seeds >= 1, got {args.chains} and {args.seeds}")
    if args.quick:
        torch.manual_seed(0)
        model, trained = SmallCNN(in_channels=1, num_classes=5, image_size=28, width=8), False
        chains, seeds = 16, 1
    else:
        from fastood.pretrain import pretrained_small_cnn

        model = pretrained_small_cnn("mnist5k-0to4", epochs=args.pretrain_epochs, cache=args.cache, progress=False)
        trained, chains, seeds = True, args.chains, args.seeds
    model = model.to(device).eval()
    shape = (1, 28, 28)
    dtypes = {name: DTYPES[name] for name in args.precisions}

    rows, runs = [], []
    for scenario, kwargs in SCENARIOS.items():
        records = {name: [] for name in dtypes}
        for seed in range(seeds):
            torch.manual_seed(seed)
            sampler = ComparingSampler(dtypes, **kwargs)
            sampler.sample(model, chains, shape)
            for name in dtypes:
                records[name] += sampler.records[name]
        for name in dtypes:
            s = summarize(records[name])
            rows.append({"model": "smallcnn (trained)" if trained else "smallcnn (untrained)", "scenario": scenario,
                         "precision": name, "chains": chains, "seeds": seeds, **s})
        base = [whole_run(model, chains, shape, "fp32", seed, device, **kwargs) for seed in range(seeds)]
        for name in ["fp32"] + list(dtypes):
            got = base if name == "fp32" else [whole_run(model, chains, shape, name, seed, device, **kwargs)
                                              for seed in range(seeds)]
            runs.append({"scenario": scenario, "precision": name,
                         **{k: statistics.mean(r[k] for r in got) for k in ("mean_steps", "confidence", "energy")}})

    native, why = precision_mod.bf16_native(device)
    print(f"sign(grad_x E) in low precision vs float32 along FIG sampler runs on {device} "
          f"({torch.get_num_threads()} threads); bf16 native here: {native} ({why})")
    print_table(rows, [("model", "model", "s"), ("scenario", "scenario", "s"), ("precision", "vs fp32", "s"),
                       ("chain_updates", "chain updates", "d"), ("agree", "agree", ".4f"),
                       ("agree_above_median", "agree |g|>median", ".4f"), ("zero", "zero", ".4f"),
                       ("worst_update_agree", "worst update", ".4f"),
                       ("worst_update_agree_above_median", "worst |g|>med", ".4f")],
                title="sign agreement (fraction of input coordinates, every update of every chain)")
    print_table(runs, [("scenario", "scenario", "s"), ("precision", "precision", "s"),
                       ("mean_steps", "updates/chain", ".2f"), ("confidence", "final conf", ".4f"),
                       ("energy", "final energy", ".3f")],
                title=f"whole runs, same seeds ({seeds} x {chains} chains): float32 vs sampling in low precision")
    write_json(args.json, {"sign_agreement": rows, "whole_runs": runs},
               environment(device, benchmark="sign_agreement", trained=trained, bf16_native=native, why=why))
    return rows, runs


if __name__ == "__main__":
    main()
