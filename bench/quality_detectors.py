"""Detectors on a pretrained SmallCNN (mnist5k-0to4): MSP, Energy, ODIN, Mahalanobis.

    python bench/quality_detectors.py [--json PATH] [--cache DIR]

ODIN's (T, epsilon) and Mahalanobis' epsilon are picked on a validation split -- held-out ID training
images vs auxiliary "blobs" outliers -- never on the test OOD sets.
"""
import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import print_per_set_auroc, write_reports_json  # noqa: E402
from fastood.data import auxiliary_outliers, benchmark  # noqa: E402
from fastood.detectors import MSP, ODIN, Energy, Mahalanobis, tune_detector  # noqa: E402
from fastood.evaluation import compare, evaluate  # noqa: E402
from fastood.pretrain import pretrained_small_cnn  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--cache")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bench = benchmark("mnist5k-0to4")
    model = pretrained_small_cnn(cache=args.cache, progress=False)
    n = len(bench.id_train)
    val_idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 5].tolist()
    id_val = DataLoader(Subset(bench.id_train, val_idx), batch_size=256)
    ood_val = DataLoader(auxiliary_outliers("blobs", n=400, shape=bench.shape), batch_size=256)
    fit_loader = DataLoader(bench.id_train, batch_size=256)
    odin, odin_params, _ = tune_detector(lambda **p: ODIN(model, **p),
                                         {"T": [1.0, 10.0, 1000.0], "epsilon": [0.0, 0.002, 0.01]}, id_val, ood_val)
    maha, maha_params, _ = tune_detector(lambda **p: Mahalanobis(model, **p), {"epsilon": [0.0, 0.002, 0.01]},
                                         id_val, ood_val, fit_loader=fit_loader)
    id_test = DataLoader(bench.id_test, batch_size=256)
    ood = {k: DataLoader(v, batch_size=256) for k, v in bench.ood.items()}
    reports = {"MSP": evaluate(MSP(model), id_test, ood, progress=False),
               "Energy (T=1)": evaluate(Energy(model), id_test, ood, progress=False),
               f"ODIN {odin_params}": evaluate(odin, id_test, ood, progress=False),
               f"Mahalanobis {maha_params}": evaluate(maha, id_test, ood, progress=False)}
    print("SmallCNN pretrained by StandardTrainer on mnist5k-0to4; mean over OOD sets", list(ood))
    print(compare(reports))
    print_per_set_auroc(reports, "\nper-set AUROC:")
    write_reports_json(args.json, reports)
    return reports


if __name__ == "__main__":
    main()
