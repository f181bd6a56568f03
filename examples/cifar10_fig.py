"""FIG on CIFAR-10 with a ResNet-18, for data already on disk: pretrain (or load), fine-tune, evaluate.

One GPU:
    python examples/cifar10_fig.py --root ~/data --out runs/cifar10-fig
Several GPUs (DistributedDataParallel; --batch-size is per GPU):
    torchrun --nproc_per_node=4 examples/cifar10_fig.py --root ~/data --out runs/cifar10-fig
Check the script without the data (random images, CPU is fine, also under torchrun):
    python examples/cifar10_fig.py --fake-data --pretrain-epochs 1 --fig-epochs 1 --device cpu

The ID data is torchvision's CIFAR-10 under --root (pass --download to fetch it). OOD test sets: SVHN and
CIFAR-100 test splits when they are found under --root, plus Gaussian/uniform noise. Images are mapped to
[-1, 1], the box the Langevin sampler draws in. Interrupted runs continue from the checkpoints in --out when
started again with the same arguments.
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from fastood import distributed as D  # noqa: E402
from fastood.data import noise, torchvision_dataset  # noqa: E402
from fastood.detectors import MSP, Energy  # noqa: E402
from fastood.evaluation import compare, evaluate  # noqa: E402
from fastood.models import resnet18_cifar  # noqa: E402
from fastood.samplers import LangevinSampler  # noqa: E402
from fastood.trainers import FIGTrainer, StandardTrainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data", help="folder holding the torchvision datasets (default: %(default)s)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    p.add_argument("--fake-data", action="store_true", help="random 3x32x32 images instead of CIFAR (smoke test)")
    p.add_argument("--out", default="runs/cifar10-fig", help="checkpoints, models and report (default: %(default)s)")
    p.add_argument("--pretrained", help="a state_dict of resnet18_cifar(10) to fine-tune (skips pretraining)")
    p.add_argument("--pretrain-epochs", type=int, default=100, help="cross-entropy epochs (default: %(default)s)")
    p.add_argument("--fig-epochs", type=int, default=10, help="FIG fine-tuning epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step per process (default: %(default)s)")
    p.add_argument("--k", type=float, default=0.1,
                   help="generated samples per ID image (FIG's K; default: %(default)s)")
    p.add_argument("--langevin-steps", type=int, default=20, help="max Langevin steps per chain (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def datasets(args):
    """(augmented train set, ID test set, {OOD name: test set}); all images in [-1, 1]."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    if args.fake_data:
        to_tensor = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        train = tvd.FakeData(128, (3, 32, 32), 10, transform=to_tensor, random_offset=0)
        test = tvd.FakeData(64, (3, 32, 32), 10, transform=to_tensor, random_offset=1)
        ood = {"fake-ood": tvd.FakeData(64, (3, 32, 32), 10, transform=to_tensor, random_offset=2)}
    else:
        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize([0.5] * 3, [0.5] * 3)])
        train = torchvision_dataset("cifar10", args.root, train=True, download=args.download)
        train.transform = augment  # the pretraining recipe of the papers: crop + flip
        test = torchvision_dataset("cifar10", args.root, train=False, download=args.download)
        ood = {}
        for name in ("svhn", "cifar100"):
            try:
                ood[name] = torchvision_dataset(name, args.root, train=False, download=args.download)
            except FileNotFoundError as exc:
                if D.is_main_process():
                    print(f"skipping OOD set {name}: {exc}")
    n = min(len(test), 10000)
    ood["gaussian"] = noise("gaussian", n, (3, 32, 32), seed=args.seed + 1)
    ood["uniform"] = noise("uniform", n, (3, 32, 32), seed=args.seed + 2)
    return train, test, ood


def report(name, model, test, ood, args):
    """MSP and Energy reports of ``model`` (rank 0 only)."""
    id_loader = DataLoader(test, batch_size=512, num_workers=args.workers)
    ood_loaders = {k: DataLoader(Subset(v, range(min(len(v), len(test)))), batch_size=512, num_workers=args.workers)
                   for k, v in ood.items()}
    out = {}
    for det in (MSP(model), Energy(model)):
        r = evaluate(det, id_loader, ood_loaders, progress=not args.quiet)
        r.to_json(os.path.join(args.out, f"{name}-{det.name}.json"))
        out[f"{name} / {det.name}"] = r
    return out


def main(argv=None):
    args = parse_args(argv)
    info = D.init_from_env(device=args.device)
    device = info.device
    os.makedirs(args.out, exist_ok=True)
    train, test, ood = datasets(args)
    loader = D.distributed_loader(train, args.batch_size, seed=args.seed, drop_last=True,
                                  num_workers=args.workers, pin_memory=device.type == "cuda")

    D.seed_everything(args.seed)  # the same initialization on every rank (DDP also broadcasts rank 0's)
    model = resnet18_cifar(num_classes=10).to(device)
    if info.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the global batch
    bar = not args.quiet

    # 1. Cross-entropy pretraining (SGD 0.1, momentum 0.9, wd 5e-4, LR /10 at 50% and 75%), resumable.
    if args.pretrained:
        model.load_state_dict(torch.load(args.pretrained, map_location=device, weights_only=True))
    else:
        StandardTrainer(model, device=device, progress=bar, seed=args.seed,
                        checkpoint_dir=os.path.join(args.out, "pretrain")).fit(loader, epochs=args.pretrain_epochs)
    results = report("pretrained", model, test, ood, args) if info.is_main else {}
    D.barrier()

    # 2. FIG fine-tuning (Algorithm 2): each rank draws its own Langevin samples (per-rank seeds).
    cuda = device.type == "cuda"
    sampler = LangevinSampler(max_steps=args.langevin_steps, channels_last=cuda, precision="bf16" if cuda else "fp32")
    D.seed_everything(args.seed, per_rank=True)
    fig = FIGTrainer(model, sampler=sampler, k=args.k, device=device, progress=bar, seed=args.seed,
                     checkpoint_dir=os.path.join(args.out, "fig"))
    fig.fit(loader, epochs=args.fig_epochs)

    # 3. Evaluation and the fine-tuned weights, from rank 0.
    if info.is_main:
        results.update(report("FIG", model, test, ood, args))
        torch.save(model.state_dict(), os.path.join(args.out, "resnet18_fig.pt"))
        print(compare(results))
        last = fig.history[-1] if fig.history else {}
        if "gen_confidence" in last:
            print(f"generated samples' mean confidence at the last step: {last['gen_confidence']:.3f}")
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
