"""CVAE-generated outliers on mnist5k-0to4: the (n+1)-class classifier (Vernekar et al. 2019) and CMG stage 2
(energy and softmax) against the pretrained SmallCNN's maximum softmax probability.

    python bench/quality_cvae.py [--json PATH] [--png PATH] [--cache DIR] [--quick]

Trains two small conditional VAEs on the ID training set (one-hot conditioning for the manifold outliers,
learned embeddings for CMG), then
  - n+1: the pretrained SmallCNN with its head grown to 6 outputs, fine-tuned by ManifoldTrainer
    (ID : type I : type II = 2:1:1, OOD class weight 0.1, beta ~ U[0.1, 1]); detector ExtraClass;
  - CMG-energy / CMG-softmax: the pretrained SmallCNN's last layer fine-tuned by CMGTrainer on cached features
    against class-mixed images; detectors Energy / ExtraClass;
and reports the mean AUROC over the benchmark's OOD sets and the ID accuracy, next to the pretrained model's MSP.
A PNG grid shows, row by row: ID images, their type-I outliers, the type-I steps stretched to be visible,
type-II outliers, class-mixed images. Epoch counts are small on purpose (about 6 minutes on a 2-core CPU).
"""
import argparse
import copy
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import print_per_set_auroc, write_reports_json  # noqa: E402
from fastood.data import benchmark  # noqa: E402
from fastood.detectors import MSP, Energy  # noqa: E402
from fastood.evaluation import compare, evaluate  # noqa: E402
from fastood.models.cvae import ConditionalVAE  # noqa: E402
from fastood.pretrain import pretrained_small_cnn  # noqa: E402
from fastood.samplers.class_mix import ClassMixSampler  # noqa: E402
from fastood.samplers.manifold import ManifoldSampler  # noqa: E402
from fastood.trainers.cmg import CMGTrainer  # noqa: E402
from fastood.trainers.cvae import CVAETrainer  # noqa: E402
from fastood.trainers.manifold import ManifoldTrainer  # noqa: E402

#: The mnist5k CVAE: small enough that type-I outliers (Jacobian included) are cheap on a CPU.
MNIST_CVAE = dict(latent_dim=8, width=16, hidden=128)


def train_cvae(bench, conditioning, epochs, seed):
    c, h, _ = bench.shape
    torch.manual_seed(seed)
    cvae = ConditionalVAE(c, h, bench.num_classes, conditioning=conditioning, **MNIST_CVAE)
    loader = DataLoader(bench.id_train, batch_size=64, shuffle=True, drop_last=True)
    trainer = CVAETrainer(cvae, progress=False, seed=seed).fit(loader, epochs=epochs)
    last = trainer.history[-len(loader):]
    print(f"CVAE ({conditioning}): {epochs} epochs, last-epoch loss {sum(h['loss'] for h in last) / len(last):.1f} "
          f"(recon {sum(h['recon'] for h in last) / len(last):.1f}, KL {sum(h['kl'] for h in last) / len(last):.1f})")
    return cvae.eval()


def sample_grid(path, bench, manifold, class_mix, per_row=12):
    """Rows: ID images; their type-I outliers; the type-I perturbations ``x~ - x`` stretched to the full grey range
    (each image by its own max |value|: the step itself is too small to see); type-II outliers (classes 0, 1, 2, ...
    in turn); class-mixed images. All in [-1, 1]; written with torchvision's save_image."""
    from torchvision.utils import save_image

    labels = bench.id_train.labels
    by_class = [torch.nonzero(labels == c).flatten() for c in range(bench.num_classes)]
    index = [int(by_class[k % bench.num_classes][k // bench.num_classes]) for k in range(per_row)]  # classes in turn
    x, y = bench.id_train.images[index], labels[index]
    type1 = manifold.type1(x, y)
    step = type1 - x
    step = step / step.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    rows = [x, type1, step, manifold.type2(per_row, torch.arange(per_row) % bench.num_classes),
            class_mix.sample(None, per_row)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_row, padding=2, pad_value=0.5)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the reports as JSON to this path")
    parser.add_argument("--png", default="quality_cvae_samples.png", help="sample grid (default: %(default)s)")
    parser.add_argument("--cache", help="cache directory of the pretrained SmallCNN")
    parser.add_argument("--cvae-epochs", type=int, default=20)
    parser.add_argument("--nplus1-epochs", type=int, default=2)
    parser.add_argument("--cmg-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--beta", type=float, nargs=2, default=(0.1, 1.0), metavar=("LOW", "HIGH"),
                        help="type-I step size range (default: the paper's 0.1 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few epochs of everything (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cvae_epochs, args.nplus1_epochs, args.cmg_epochs = 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = benchmark("mnist5k-0to4", seed=args.seed)
    c, h, _ = bench.shape
    pretrained = pretrained_small_cnn(cache=args.cache, progress=False)
    train_loader = DataLoader(bench.id_train, batch_size=64, shuffle=True, drop_last=True)

    cvae_onehot = train_cvae(bench, "onehot", args.cvae_epochs, args.seed)
    cvae_embed = train_cvae(bench, "embedding", args.cvae_epochs, args.seed)
    manifold = ManifoldSampler(cvae_onehot, beta_range=tuple(args.beta))
    manifold.fit(DataLoader(bench.id_train, batch_size=256))
    print(f"class ellipsoid radii (95%): {[round(float(r), 2) for r in manifold.radii]}")

    torch.manual_seed(args.seed)
    nplus1 = copy.deepcopy(pretrained)  # its 5-way head grows a 6th output (trained rows kept)
    nplus1_trainer = ManifoldTrainer(nplus1, manifold, extend_head=True, progress=False, seed=args.seed)
    nplus1_trainer.fit(train_loader, epochs=args.nplus1_epochs)
    cmg = {}
    for mode in ("energy", "softmax"):
        torch.manual_seed(args.seed)
        model = copy.deepcopy(pretrained)
        cmg[mode] = CMGTrainer(model, cvae_embed, mode=mode, progress=False, seed=args.seed)
        cmg[mode].fit(train_loader, epochs=args.cmg_epochs)
        if mode == "energy":
            print(f"CMG-energy margins: m_in {cmg[mode].m_in:.2f}, m_out {cmg[mode].m_out:.2f}")

    id_test = DataLoader(bench.id_test, batch_size=256)
    ood = {k: DataLoader(v, batch_size=256) for k, v in bench.ood.items()}
    detectors = {"pretrained MSP": MSP(pretrained), "pretrained Energy": Energy(pretrained),
                 "n+1 (ExtraClass)": nplus1_trainer.detector(),
                 "CMG-energy (Energy)": cmg["energy"].detector(), "CMG-softmax (ExtraClass)": cmg["softmax"].detector()}
    reports = {name: evaluate(det, id_test, ood, progress=False) for name, det in detectors.items()}
    print(f"\nmnist5k-0to4, mean over OOD sets {list(ood)} (percent)")
    print(compare(reports))
    print_per_set_auroc(reports, "\nper-set AUROC:")
    grid = sample_grid(args.png, bench, manifold, ClassMixSampler(cvae_embed))
    print(f"\nsample grid (rows: ID, type I, type-I step stretched, type II, class-mixed): {grid}")
    print(f"total time {time.perf_counter() - start:.0f} s")
    write_reports_json(args.json, reports)
    return reports


if __name__ == "__main__":
    main()
