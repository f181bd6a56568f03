"""The two-head discrepancy trainer (Yu & Aizawa, ICCV 2019) on mnist5k-0to4, transductive, over several seeds.

    python bench/quality_twohead.py [--seeds 0 1 2] [--steps 286] [--json PATH] [--threads 1]

Same protocol as the two-head row of bench/quality_outliers.py: the cached pretrained SmallCNN
(fastood.pretrain.pretrained_small_cnn) becomes ``TwoHead.from_model`` (head 1 = its trained head, head 2 fresh);
the unlabeled data is one half of every test set (ID test images and every OOD set, labels dropped) and every row
is evaluated on the other halves (the data split is fixed; the seeds vary the training run). Every row gets the
same budget of ``--steps`` mini-batches (pre-training included), lr 0.1, batch 64 labeled + 64 unlabeled.

Rows:
  - MSP of the pretrained model (the baseline);
  - ``pretrain_steps=0, joint``: the old default (fine-tuning starts with head 2 random, one combined update);
  - ``pretrain_steps=100, joint``: what bench/quality_outliers.py used to pass;
  - ``auto pretrain, joint``: head 2 pre-trained until it matches head 1, then one combined update per batch;
  - ``auto pretrain, paper`` (the default): the same pre-training, then step A + step B per mini-batch.
Mechanism figures beside AUROC: pre-training steps taken, the last epoch's mean entropy gap over the margin
(``margin_reached``), head 2's accuracy when pre-training ended. Mean +- std over the seeds.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastood.data import benchmark  # noqa: E402
from fastood.detectors import MSP  # noqa: E402
from fastood.evaluation import evaluate  # noqa: E402
from fastood.models import TwoHead  # noqa: E402
from fastood.pretrain import pretrained_small_cnn  # noqa: E402
from fastood.protocol import mean_std as _protocol_mean_std  # noqa: E402
from fastood.trainers.discrepancy import DiscrepancyTrainer  # noqa: E402
from quality_outliers import halves, unlabeled_images  # noqa: E402

ROWS = {
    "pretrain_steps=0, joint (old default)": dict(pretrain_steps=0, schedule="joint"),
    "pretrain_steps=100, joint (old bench)": dict(pretrain_steps=100, schedule="joint"),
    "auto pretrain, joint": dict(schedule="joint"),
    "auto pretrain, paper (default)": dict(),
}


def mean_std(values):
    mean, std = _protocol_mean_std([v for v in values if v is not None])
    if mean != mean:
        return "n/a"
    return f"{mean:7.2f} +- {std:5.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=286, help="mini-batches per run, pre-training included "
                        "(default: 100 + 6 epochs of 31, the old bench's budget)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    bench = benchmark("mnist5k-0to4", seed=0)
    pretrained = pretrained_small_cnn(cache=args.cache, progress=False)
    id_unlabeled, id_eval = halves(bench.id_test, 10)
    split = {name: halves(ds, 11 + i) for i, (name, ds) in enumerate(bench.ood.items())}
    id_loader = DataLoader(id_eval, batch_size=256)
    ood_loaders = {name: DataLoader(held_out, batch_size=256) for name, (_, held_out) in split.items()}
    unlabeled = unlabeled_images([id_unlabeled] + [first for first, _ in split.values()])
    train = DataLoader(bench.id_train, batch_size=64, shuffle=True, drop_last=True)

    msp = evaluate(MSP(pretrained), id_loader, ood_loaders, progress=False)
    results = {name: [] for name in ROWS}
    for seed in args.seeds:
        for name, options in ROWS.items():
            torch.manual_seed(seed)
            unlabeled_loader = DataLoader(unlabeled, batch_size=64, shuffle=True, drop_last=True)
            trainer = DiscrepancyTrainer(TwoHead.from_model(copy.deepcopy(pretrained)), unlabeled=unlabeled_loader,
                                         progress=False, seed=seed, **options)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.fit(train, steps=args.steps)
            report = evaluate(trainer.detector(), id_loader, ood_loaders, progress=False)
            tuned = [h for h in trainer.history if h.get("phase") == 1.0][-len(train):]
            pre = trainer.pretrain_result or {}
            results[name].append({
                "seed": seed, "auroc": report.average["auroc"], "id_accuracy": report.id_accuracy,
                "per_set": {k: v["auroc"] for k, v in report.metrics.items()},
                "pretrain_steps": pre.get("steps", 0), "head2_acc_at_switch": pre.get("acc2"),
                "margin_reached": sum(h["margin_reached"] for h in tuned) / len(tuned) if tuned else None,
                "warnings": [str(w.message)[:160] for w in caught]})
            print(f"seed {seed} {name}: AUROC {100 * report.average['auroc']:.2f}, ID acc "
                  f"{100 * report.id_accuracy:.2f}, pre-training {pre.get('steps', 0)} steps, margin reached "
                  f"{results[name][-1]['margin_reached']}", flush=True)

    print(f"\nmnist5k-0to4, transductive two-head, {args.steps} mini-batches per run, seeds {args.seeds}; "
          f"evaluated on the held-out halves (mean over the OOD sets {list(ood_loaders)})")
    header = f"{'row':40s} {'AUROC %':>16s} {'ID acc %':>16s} {'pretrain steps':>16s} {'margin reached':>16s}"
    print(header + "\n" + "-" * len(header))
    print(f"{'MSP (pretrained)':40s} {100 * msp.average['auroc']:7.2f}{'':9s} {100 * msp.id_accuracy:7.2f}")
    for name, runs in results.items():
        print(f"{name:40s} {mean_std([100 * r['auroc'] for r in runs]):>16s} "
              f"{mean_std([100 * r['id_accuracy'] for r in runs]):>16s} "
              f"{mean_std([r['pretrain_steps'] for r in runs]):>16s} "
              f"{mean_std([r['margin_reached'] for r in runs]):>16s}")
    print("\nper-set AUROC (mean over seeds, %)")
    for name, runs in results.items():
        sets = runs[0]["per_set"]
        print(f"  {name:40s} " + ", ".join(f"{k} {100 * statistics.mean(r['per_set'][k] for r in runs):.1f}"
                                          for k in sets))
    print(f"total {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "msp": msp.to_dict(), "rows": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
