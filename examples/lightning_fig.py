"""FIG fine-tuning inside a PyTorch Lightning module: fastood's FIGObjective as the LightningModule's training_step.

    pip install lightning
    python examples/lightning_fig.py                         # mnist5k-0to4 (offline), fastood's pretrained SmallCNN
    python examples/lightning_fig.py --steps 250 --accelerator gpu
    python examples/lightning_fig.py --fake-data --steps 2   # smoke test: random images, an untrained CNN

What fastood's FIGTrainer does for you, and this module does by hand:

- Modes. FIG fine-tunes in train mode (dropout on) with BatchNorm frozen (FIGTrainer's ``freeze_bn=True``): the
  generated batch would otherwise drag the running statistics away from the ID data. Lightning switches modes
  around your steps: older versions call ``.train()`` on the whole module at every epoch start, and a validation
  loop whose ``on_validation_model_train`` hook is the classic ``self.trainer.model.train()`` does so after every
  validation, so a BatchNorm freeze done once in ``__init__`` or ``on_fit_start`` does not last. ``training_step``
  therefore runs the objective inside ``fastood.frozen_batchnorm(self.model)``, which puts every BatchNorm layer
  in eval mode for the step and restores its mode afterwards (freezing in ``on_train_batch_start`` works as well).
  Lightning 2.2 and later keep the modes the model comes with, and a pretrained model often comes in eval mode
  (``fastood.pretrain.pretrained_small_cnn`` returns one): ``on_fit_start`` puts it in train mode, as FIGTrainer
  does.
- The sampler, the sample count (``ceil(k * b)``), the loss and the data-range check (a warning, once, when the
  images do not fit the sampler's box) are the objective's.
- Precision. The Langevin sampler runs its chains in its own ``precision`` (``LangevinSampler(precision=...)``,
  default "auto" = float32 for now) whatever autocast Lightning's ``precision="bf16-mixed"`` puts around the
  step, on CPU and CUDA alike; the fine-tuning forward follows Lightning's precision.

Detector after fine-tuning: maximum softmax probability (``fastood.detectors.MSP(module.model)``, higher score =
more OOD), evaluated here on the benchmark's OOD sets.
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import lightning as L  # noqa: E402

import fastood  # noqa: E402
from fastood.samplers import LangevinSampler  # noqa: E402


class FIGModule(L.LightningModule):
    """A classifier fine-tuned with FIG (Zhao, Cao, Lin, TNNLS, Algorithm 2): SGD lr 1e-3, momentum 0.9, weight
    decay 5e-4; per batch of b ID images ``ceil(k b)`` Langevin samples from the current model, loss
    ``CE - lam * mean H(softmax(f(x_gen)))``. Logs every figure of the objective under ``train/``."""

    def __init__(self, model: nn.Module, sampler=None, k: float = 0.1, lam: float = 1.0, lr: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        self.model = model
        self.fig = fastood.FIGObjective(sampler if sampler is not None else LangevinSampler(), k=k, lam=lam)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        self.model.train()  # dropout on while fine-tuning, as FIGTrainer; BatchNorm is frozen per step below

    def training_step(self, batch, batch_idx):
        x, y = batch
        with fastood.frozen_batchnorm(self.model):  # Lightning set .train() on everything: freeze BatchNorm again
            loss, logs = self.fig(self.model, x, y)
        self.log_dict({f"train/{name}": value for name, value in logs.items()}, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


def fake_data(n=64, shape=(1, 28, 28), classes=5, seed=0):
    """Random images in [-1, 1] (the sampler's default box) and labels: a smoke test without any data."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand((n, *shape), generator=g) * 2 - 1, torch.randint(classes, (n,), generator=g))


def small_cnn(classes=5, channels=1):
    """An untrained CNN with BatchNorm (for --fake-data)."""
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, classes))


def fit(model, loader, steps, sampler=None, accelerator="cpu", progress=False, **module_args):
    """Fine-tune ``model`` with FIG for ``steps`` optimizer steps under a Lightning Trainer; returns the module."""
    module = FIGModule(model, sampler=sampler, **module_args)
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False)
    trainer.fit(module, loader)
    module.logged = {name: float(value) for name, value in trainer.logged_metrics.items()}
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=62, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=float, default=0.1, help="generated samples per ID sample (paper: 0.1)")
    p.add_argument("--max-sampler-steps", type=int, default=20, help="Langevin steps per chain at most")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--fake-data", action="store_true", help="random images and an untrained CNN (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    sampler = LangevinSampler(max_steps=args.max_sampler_steps, bounds=(-1.0, 1.0))
    if args.fake_data:
        model, train, bench = small_cnn(), fake_data(), None
    else:
        from fastood.data import benchmark
        from fastood.pretrain import pretrained_small_cnn

        bench = benchmark("mnist5k-0to4")                 # images in [-1, 1]: the sampler's box
        model, train = pretrained_small_cnn(progress=False), bench.id_train
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    module = fit(model, loader, args.steps, sampler=sampler, k=args.k, accelerator=args.accelerator,
                 progress=not args.fake_data)
    print({name: round(value, 4) for name, value in sorted(module.logged.items())})
    if bench is not None:
        from fastood.detectors import MSP
        from fastood.evaluation import evaluate

        module.model.eval()
        report = evaluate(MSP(module.model), DataLoader(bench.id_test, batch_size=256),
                          {name: DataLoader(ds, batch_size=256) for name, ds in bench.ood.items()}, progress=False)
        print(report.table())
    return module


if __name__ == "__main__":
    main()
