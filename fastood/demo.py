"""The pipeline behind ``fastood demo``, ``fastood train`` and ``fastood eval``.

``run_demo(RunConfig())`` is the one-command experiment: pretrain a classifier on a built-in benchmark
(cached, so a second run skips it), fine-tune it with FIG (or every method), evaluate detectors before and
after on every OOD set, print one table and write a report folder::

    OUT/results.json        configuration, timings, every row's metrics per OOD set
    OUT/results.csv         one line per (row, OOD set) and per row average
    OUT/table.txt           the printed tables
    OUT/plots/ROW-roc.png, OUT/plots/ROW-histograms.png     (Report.plot; higher score = more OOD)
    OUT/samples/METHOD.png  a grid of the method's generated outliers
    OUT/models/METHOD.pt    the trained model (``fastood eval`` reads it)
    OUT/checkpoints/METHOD/checkpoint.pt    resumable training state

Under ``torchrun`` every rank trains (DDP, :mod:`fastood.distributed`), rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Subset

from fastood import distributed as D
from fastood.weights_cache import load_cached_weights, save_cached_weights

MODEL_FORMAT = "fastood-model"
DEFAULT_OUTLIERS = "blobs"  # auxiliary training outliers, disjoint from every test OOD set
OUTLIERS_PER_ID_BATCH = 2  # outlier batch / ID batch: 256 / 128 in the OE, Energy-OE and ICE recipes
CVAE_SIZE = dict(latent_dim=8, width=16, hidden=128)  # the conditional VAE of the manifold and CMG methods


class PipelineError(Exception):
    """A problem the user can fix (bad option combination, missing file): the CLI prints it without a traceback."""


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Everything a run depends on. ``tiny`` shrinks every stage (for tests): the numbers then mean nothing."""

    methods: list = field(default_factory=lambda: ["fig"])
    data: str = "mnist5k-0to4"
    model: str = "smallcnn"
    epochs: Optional[int] = None        # per method; None: the method's default
    steps: Optional[int] = None         # per method, instead of epochs
    batch_size: int = 64
    lr: Optional[float] = None          # None: the method's paper default
    device: str = "auto"
    seed: int = 0
    out: str = "fastood-demo"
    cache: Optional[str] = None
    pretrain_epochs: int = 6
    pretrained: Optional[str] = None    # a model file to fine-tune instead of the cached pretrained classifier
    resume: bool = False
    checkpoint_minutes: Optional[float] = None  # also checkpoint every this many minutes of wall time
    skip_nonfinite: bool = False        # skip (and count) batches with a non-finite loss
    ddp_timeout: float = 1800.0         # seconds a collective waits for the other ranks (torchrun)
    sync_bn: bool = False               # BatchNorm statistics over the global batch under DDP
    quiet: bool = False
    tiny: bool = False
    width: int = 32                     # SmallCNN width
    cvae_epochs: int = 10
    eval_limit: Optional[int] = None    # at most this many images per test set
    train_limit: Optional[int] = None   # at most this many ID training images
    grid: int = 64                      # generated samples in each PNG grid
    plots: bool = True                  # ROC curves and histograms (needs matplotlib)
    detectors: Optional[list] = None    # demo: detectors of every row (names or "all"); None: MSP, Energy + own
    trainer_options: dict = field(default_factory=dict)  # extra trainer keyword arguments (``--set KEY=VALUE``)

    def __post_init__(self):
        if self.tiny:
            self.pretrain_epochs = min(self.pretrain_epochs, 1)
            self.width = min(self.width, 8)
            self.cvae_epochs = 1
            self.eval_limit = self.eval_limit or 64
            self.train_limit = self.train_limit or 256
            self.grid = min(self.grid, 16)
            if self.epochs is None and self.steps is None:
                self.steps = 2

    @classmethod
    def from_args(cls, args, **overrides) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update({k: v for k, v in overrides.items() if k in names})
        if values.get("out") is None:
            values.pop("out", None)
        return cls(**values)

    @property
    def progress(self) -> bool:
        return not self.quiet and D.is_main_process()


# ----------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One trainer as the CLI runs it. ``build(ctx)`` -> :class:`Built`; ``epochs``: default training length;
    ``extra``: detectors evaluated beside the method's own (``trainer.detector()``)."""

    name: str
    label: str
    paper: str
    build: Callable
    epochs: int
    extra: tuple = ("msp", "energy")
    fine_tunes: bool = True


@dataclass
class Built:
    trainer: object
    model: torch.nn.Module
    samples: Optional[Callable[[int], torch.Tensor]] = None   # n -> generated images [n, C, H, W] in [-1, 1]


def _build_standard(ctx):
    from fastood.trainers.standard import StandardTrainer

    model = ctx.new_model()
    return Built(StandardTrainer(model, **ctx.trainer_kwargs("standard")), model)


def _build_fig(ctx):
    from fastood.samplers.langevin import LangevinSampler
    from fastood.trainers.fig import FIGTrainer

    model = ctx.pretrained()
    # The trainer's default sampler carries the paper's settings; --tiny only shortens the chains.
    sampler = LangevinSampler(max_steps=5) if ctx.config.tiny else None
    trainer = FIGTrainer(model, **ctx.trainer_kwargs("fig", sampler=sampler))
    return Built(trainer, model, lambda n: trainer.sampler.sample(model, n, ctx.shape))


def _build_gs(ctx):
    from fastood.trainers.fig import GaussianNoiseTrainer

    model = ctx.pretrained()
    trainer = GaussianNoiseTrainer(model, **ctx.trainer_kwargs("gs"))
    return Built(trainer, model, lambda n: trainer.sampler.sample(model, n, ctx.shape))


def _build_manifold(ctx):
    from fastood.trainers.manifold import ManifoldTrainer

    cvae = ctx.cvae("onehot")
    # Fine-tunes the pretrained classifier with its head grown to n + 1 outputs (class n + 1 = outlier).
    trainer = ManifoldTrainer(ctx.pretrained(), cvae, **ctx.trainer_kwargs("manifold", extend_head=True))
    sampler = trainer.sampler  # fitted on the training loader when fit starts

    def samples(n):
        x, y = ctx.first_batch(n // 2)
        return torch.cat([sampler.type1(x, y), sampler.type2(n - n // 2)])

    return Built(trainer, trainer.model, samples)


def _build_cmg(mode):
    def build(ctx):
        from fastood.trainers.cmg import CMGTrainer

        trainer = CMGTrainer(ctx.pretrained(), ctx.cvae("embedding"), **ctx.trainer_kwargs(f"cmg-{mode}", mode=mode))
        # trainer.classifier = head(backbone(x)) on images (the pretrained model's own modules, fine-tuned head).
        return Built(trainer, trainer.classifier, lambda n: trainer.sampler.sample(None, n))
    return build


def _build_oe(ctx):
    from fastood.trainers.oe import OETrainer

    model = ctx.pretrained()
    return Built(OETrainer(model, **ctx.trainer_kwargs("oe", outliers=ctx.outlier_loader())), model)


def _build_energy_oe(ctx):
    from fastood.trainers.oe import EnergyOETrainer

    model = ctx.pretrained()
    # The paper's margins (-25, -7) are CIFAR-10 energies; "auto" measures them on this model and data first.
    trainer = EnergyOETrainer(model, **ctx.trainer_kwargs("energy-oe", outliers=ctx.outlier_loader(), margins="auto"))
    return Built(trainer, model)


def _build_ice(ctx):
    from fastood.trainers.ice import ICETrainer

    model = ctx.pretrained()
    trainer = ICETrainer(model, **ctx.trainer_kwargs("ice", outliers=ctx.outlier_loader()))
    return Built(trainer, trainer.model)


def _build_discrepancy(ctx):
    from fastood.models import TwoHead
    from fastood.trainers.discrepancy import DiscrepancyTrainer

    # Head 1 is the pretrained head, head 2 a fresh one: the first half of the run trains both on labeled data
    # only (the paper's step A), the second half adds the unlabeled discrepancy loss (step B).
    model = TwoHead.from_model(ctx.pretrained())
    total = ctx.total_steps(METHODS["discrepancy"])
    trainer = DiscrepancyTrainer(model, **ctx.trainer_kwargs("discrepancy", unlabeled=ctx.unlabeled_loader(),
                                                             pretrain_steps=total // 2))
    return Built(trainer, model)


METHODS = {m.name: m for m in (
    Method("standard", "Standard (CE)", "cross-entropy baseline", _build_standard, epochs=6, fine_tunes=False),
    # FIG: 8 epochs (248 steps of 64): bench/quality_fig.py measured the entropy penalty costing ~1.1 points of ID
    # accuracy after 2 epochs and none after 8 (+21.1 mean AUROC, 3 seeds; docs/fidelity.md). GS: the same budget.
    Method("fig", "FIG", "Zhao, Cao, Lin, TNNLS", _build_fig, epochs=8),
    Method("gs", "GS (noise)", "FIG's Gaussian-noise baseline", _build_gs, epochs=8),
    Method("manifold", "n+1 manifold", "Vernekar et al. 2019", _build_manifold, epochs=3, extra=()),
    Method("cmg-energy", "CMG-energy", "Wang et al., ECML 2022", _build_cmg("energy"), epochs=10, extra=("msp",)),
    Method("cmg-softmax", "CMG-softmax", "Wang et al., ECML 2022", _build_cmg("softmax"), epochs=10, extra=()),
    Method("oe", "OE", "Hendrycks et al. 2019", _build_oe, epochs=2),
    Method("energy-oe", "Energy-OE", "Liu et al. 2020", _build_energy_oe, epochs=2),
    Method("ice", "ICE", "Wu et al., AAAI 2023", _build_ice, epochs=2, extra=()),
    Method("discrepancy", "Two-head discrepancy", "Yu & Aizawa, ICCV 2019", _build_discrepancy, epochs=4, extra=()),
)}


# ----------------------------------------------------------------------------------------------- the run's context
def _resolve_device(name: str, info_device: torch.device) -> torch.device:
    if name == "auto":
        return info_device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and D.world_size() > 1:
        raise PipelineError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                            "(or auto) instead of a fixed GPU")
    return device


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Context:
    """Data, device, caches and messages shared by the stages of one run."""

    def __init__(self, config: RunConfig):
        from fastood.data import benchmark

        self.config = config
        self.owns_process_group = not D.is_distributed()  # only tear down a group this run started
        self.info = D.init_from_env(device=None if config.device == "auto" else config.device,
                                    timeout_s=config.ddp_timeout)
        self.device = _resolve_device(config.device, self.info.device)
        self.cache = os.path.join(_cache_root(config.cache), "cli")
        self.timings = {}
        self.say(f"data: {config.data} (seed {config.seed}); device: {self.device}"
                 + (f"; {self.info.world_size} processes (DDP)" if self.info.world_size > 1 else ""))
        self.bench = benchmark(config.data, seed=config.seed)
        if config.train_limit is not None and len(self.bench.id_train) > config.train_limit:
            self.bench.id_train = self._subset(self.bench.id_train, config.train_limit)
        self.shape = tuple(self.bench.shape)
        self.num_classes = self.bench.num_classes
        global_batch = config.batch_size * self.info.world_size
        self.train_loader = D.distributed_loader(self.bench.id_train, config.batch_size, seed=config.seed,
                                                 drop_last=len(self.bench.id_train) >= global_batch)
        self._pretrained = None
        self._cvaes = {}

    def close(self) -> None:
        """End the process group if this run started it (under torchrun)."""
        if self.owns_process_group:
            D.cleanup()

    # ------------------------------------------------------------------ messages
    def say(self, message: str) -> None:
        if not self.config.quiet and D.is_main_process():
            print(message, flush=True)

    @contextlib.contextmanager
    def timed(self, key: str):
        """Record the wall time of the block in ``self.timings[key]`` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = round(time.perf_counter() - t0, 3)

    # ------------------------------------------------------------------ models
    def new_model(self) -> torch.nn.Module:
        """A freshly initialized classifier (the same on every rank: seeded by the run's seed)."""
        from fastood.models import SmallCNN, resnet18_cifar

        torch.manual_seed(self.config.seed)
        c, h, _ = self.shape
        if self.config.model == "smallcnn":
            return SmallCNN(in_channels=c, num_classes=self.num_classes, image_size=h, width=self.config.width)
        if self.config.model == "resnet18":
            return resnet18_cifar(num_classes=self.num_classes, in_channels=c)
        raise PipelineError(f"unknown model {self.config.model!r}; valid models: smallcnn, resnet18")

    def trainer_kwargs(self, method: str, checkpoint: bool = True, **defaults) -> dict:
        """Keyword arguments of ``method``'s trainer: ``defaults`` (the builder's choices), then the run's own
        (progress, seed, device, checkpoints, ``lr``), then ``config.trainer_options`` (``--set KEY=VALUE``), each
        overriding the one before."""
        cfg = self.config
        kwargs = dict(defaults)
        kwargs.update(progress=cfg.progress, seed=cfg.seed, device=self.device, checkpoint_every=50,
                      checkpoint_minutes=cfg.checkpoint_minutes, skip_nonfinite=cfg.skip_nonfinite, sync_bn=cfg.sync_bn)
        if checkpoint:
            kwargs["checkpoint_dir"] = self.checkpoint_dir(method)
        if cfg.lr is not None:
            kwargs["lr"] = cfg.lr
        kwargs.update(cfg.trainer_options or {})
        return kwargs

    def total_steps(self, method: "Method") -> int:
        """Optimizer steps ``method`` will run with this configuration."""
        budget = _budget(self.config, method)
        return budget["steps"] if "steps" in budget else budget["epochs"] * len(self.train_loader)

    def checkpoint_dir(self, method: str) -> str:
        return _checkpoint_dir(self.config, method)

    @property
    def _data_tag(self) -> str:
        """Part of the cache keys: which training images were used."""
        return "" if self.config.train_limit is None else f"-n{self.config.train_limit}"

    def pretrained(self) -> torch.nn.Module:
        """A copy of the cross-entropy pretrained classifier (``--pretrained`` file, else trained once and cached)."""
        if self._pretrained is None:
            cfg = self.config
            if cfg.pretrained is not None:
                self._pretrained = load_model_file(cfg.pretrained)["module"]
            else:
                self._pretrained = self._train_cached(
                    f"{cfg.model}-w{cfg.width}-{cfg.data}{self._data_tag}-e{cfg.pretrain_epochs}"
                    f"-b{cfg.batch_size * self.info.world_size}-s{cfg.seed}", self.new_model, "StandardTrainer",
                    cfg.pretrain_epochs,
                    f"pretraining {cfg.model} on {cfg.data} ({cfg.pretrain_epochs} epochs, cross-entropy)")
        return copy.deepcopy(self._pretrained).to(self.device)

    def cvae(self, conditioning: str) -> torch.nn.Module:
        """A conditional VAE of the ID training data (``"onehot"``: Vernekar et al.; ``"embedding"``: CMG), cached."""
        if conditioning not in self._cvaes:
            from fastood.models import ConditionalVAE

            cfg = self.config

            def make():
                torch.manual_seed(cfg.seed)
                c, h, _ = self.shape
                return ConditionalVAE(in_channels=c, image_size=h, num_classes=self.num_classes,
                                      conditioning=conditioning, **CVAE_SIZE)

            self._cvaes[conditioning] = self._train_cached(
                f"cvae-{conditioning}-{cfg.data}{self._data_tag}-e{cfg.cvae_epochs}"
                f"-b{cfg.batch_size * self.info.world_size}-s{cfg.seed}",
                make, "CVAETrainer", cfg.cvae_epochs,
                f"training a conditional VAE ({conditioning} conditioning, {cfg.cvae_epochs} epochs)")
        return self._cvaes[conditioning].to(self.device)

    def _train_cached(self, key: str, make: Callable, trainer_name: str, epochs: int, what: str) -> torch.nn.Module:
        """Train ``make()`` with ``trainer_name`` for ``epochs`` on the ID training set, or load it from the cache.

        The cache holds the final weights (``KEY.pt``) and, while training, a resumable checkpoint (``KEY/``), so an
        interrupted pretraining continues where it stopped. Under DDP every rank trains; rank 0 writes.
        """
        path = os.path.join(self.cache, key + ".pt")
        model = make()
        if load_cached_weights(model, path):
            self.say(f"{what}: cached, loading {path}")
            return model.to(self.device).eval()
        self.say(f"{what} -> {path}")
        if trainer_name == "StandardTrainer":
            from fastood.trainers.standard import StandardTrainer as trainer_cls
        else:
            from fastood.trainers.cvae import CVAETrainer as trainer_cls
        with self.timed(f"train {key}"):
            trainer = trainer_cls(model, progress=self.config.progress, seed=self.config.seed, device=self.device,
                                  checkpoint_dir=os.path.join(self.cache, key), checkpoint_every=50)
            trainer.fit(self.train_loader, epochs=epochs)
        if D.is_main_process():
            save_cached_weights(model, path)  # checksummed, atomic; refuses NaN/inf weights
            if trainer.checkpoint_path is not None and os.path.exists(trainer.checkpoint_path):
                os.remove(trainer.checkpoint_path)  # the final weights are cached: the resume state is done
        D.barrier()
        return model.eval()

    # ------------------------------------------------------------------ data
    def first_batch(self, n: int):
        """The first ``n`` ID training images and labels, on the device."""
        x, y = self.bench.id_train.tensors
        return x[:n].to(self.device), y[:n].to(self.device)

    def outlier_dataset(self):
        """The auxiliary training outliers: OUTLIERS_PER_ID_BATCH smooth random "blobs" per ID training image,
        disjoint from every test OOD set (an ablation replaces this method to train on other outliers)."""
        from fastood.data import auxiliary_outliers

        n = OUTLIERS_PER_ID_BATCH * len(self.bench.id_train)
        return auxiliary_outliers(DEFAULT_OUTLIERS, n=n, shape=self.shape, seed=self.config.seed + 100)

    def outlier_loader(self) -> DataLoader:
        """:meth:`outlier_dataset` in batches of OUTLIERS_PER_ID_BATCH times the ID batch (OE, Energy-OE and ICE
        train on 128 ID + 256 outliers), and as many batches as the ID loader has."""
        return D.distributed_loader(self.outlier_dataset(), OUTLIERS_PER_ID_BATCH * self.config.batch_size,
                                    seed=self.config.seed + 1, drop_last=True)

    def unlabeled_loader(self) -> DataLoader:
        """Unlabeled data for the two-head discrepancy method: ID training images mixed with the auxiliary outliers
        (never test images), labels dropped."""
        from fastood.data import ImageDataset, auxiliary_outliers

        images = self.bench.id_train.images
        outliers = auxiliary_outliers(DEFAULT_OUTLIERS, n=len(images), shape=self.shape, seed=self.config.seed + 200)
        mixed = torch.cat([images, outliers.images])
        dataset = ImageDataset(mixed, torch.full((len(mixed),), -1, dtype=torch.long), name="unlabeled")
        return D.distributed_loader(dataset, self.config.batch_size, seed=self.config.seed + 2, drop_last=True)

    def _subset(self, dataset, limit: int):
        """``limit`` images of ``dataset`` drawn without replacement (seeded), as a dataset of the same type."""
        from fastood.data import ImageDataset

        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.config.seed))[:limit]
        return ImageDataset(dataset.images[keep], dataset.labels[keep], name=getattr(dataset, "name", ""))

    def _limited(self, dataset):
        limit = self.config.eval_limit
        return self._subset(dataset, limit) if limit is not None and len(dataset) > limit else dataset

    def test_loaders(self, batch_size: int = 256):
        """(ID test loader, {OOD name: loader}) over the benchmark's test sets (subsets with ``eval_limit``)."""
        id_loader = DataLoader(self._limited(self.bench.id_test), batch_size=batch_size)
        ood = {name: DataLoader(self._limited(ds), batch_size=batch_size) for name, ds in self.bench.ood.items()}
        return id_loader, ood


def _cache_root(path):
    try:
        from fastood.pretrain import cache_dir
    except ImportError:  # keep the CLI usable if that helper moves
        return path or os.environ.get("FASTOOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastood")
    return cache_dir(path)


# ----------------------------------------------------------------------------------------------- detectors
#: Detectors that only make sense on a model trained by their own method; ``--detector all`` / ``--detectors all``
#: leave them out unless the model's own detector is one of them.
METHOD_SPECIFIC_DETECTORS = {"discrepancy": "a two-head model (DiscrepancyTrainer)",
                             "extraclass": "an n+1-class model (ManifoldTrainer, CMG-softmax)",
                             "maxidprobability": "an n+1-class model (ManifoldTrainer)",
                             "ice": "a Gaussian head (ICETrainer)"}


def detector_names(names, own: Optional[str] = None) -> list:
    """Expand ``["all"]`` (or ``"all"``) to every registered detector that a plain classifier supports, plus ``own``
    (the model's own detector, e.g. ``extraclass`` for an n+1 classifier); other names are checked and kept."""
    from fastood.detectors import DETECTORS

    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        key = name.lower()
        if key == "all":
            out += [k for k in DETECTORS if k not in METHOD_SPECIFIC_DETECTORS or k == own]
        elif key not in DETECTORS:
            raise PipelineError(f"unknown detector {name!r}; valid detectors: all, {', '.join(DETECTORS)}")
        else:
            out.append(key)
    return list(dict.fromkeys(out))


def make_detector(name: str, model: torch.nn.Module, ctx: Optional[Context] = None):
    """A detector by CLI name (``fastood.detectors.DETECTORS`` keys). With ``ctx``: detectors that learn from ID
    data (their class overrides ``Detector.fit``: Mahalanobis, relative Mahalanobis, ViM, DICE, and GM, DRF,
    OpenMax, ReAct, KNN) are fitted on the benchmark's ID training data with their paper defaults;
    ODIN and Mahalanobis are also tuned on a validation split (held-out ID training images vs auxiliary outliers),
    never on the test OOD sets. ``bench/detectors_table.py`` tunes every detector on the papers' grids."""
    from fastood.detectors import DETECTORS

    key = name.lower()
    if key not in DETECTORS:
        raise PipelineError(f"unknown detector {name!r}; valid detectors: {', '.join(DETECTORS)}")
    cls = DETECTORS[key]
    if key not in ("odin", "mahalanobis"):
        from fastood.detectors import Detector

        det = cls(model)
        if ctx is not None and cls.fit is not Detector.fit:   # fitted on the ID training data, paper defaults
            ctx.say(f"{cls.__name__}: fitting on the ID training data ({len(ctx.bench.id_train)} images)")
            det.fit(DataLoader(ctx.bench.id_train, batch_size=256))
        return det
    if ctx is None:
        return cls(model)
    from fastood.data import auxiliary_outliers
    from fastood.detectors.tuning import tune_fitted

    train = ctx.bench.id_train
    n = len(train)
    val_idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: max(1, n // 5)].tolist()
    id_val = DataLoader(Subset(train, val_idx[:ctx.config.eval_limit]), batch_size=256)
    ood_val = DataLoader(auxiliary_outliers(DEFAULT_OUTLIERS, n=len(id_val.dataset), shape=ctx.shape,
                                            seed=ctx.config.seed + 300), batch_size=256)
    if key == "odin":
        grid = {"T": [1.0, 10.0, 1000.0], "epsilon": [0.0, 0.002, 0.01]}
        fit_loader = None
    else:
        grid = {"epsilon": [0.0, 0.002, 0.01]}
        fit_loader = DataLoader(train, batch_size=256)
    # One fit shared by every grid point (Mahalanobis' epsilon does not change its fit).
    detector, params, _, _ = tune_fitted(cls(model), grid, id_val, ood_val, fit_loader=fit_loader)
    ctx.say(f"{cls.__name__}: picked {params} on the validation split")
    return detector


def _detector_key(detector) -> str:
    from fastood.detectors import DETECTORS

    for key, cls in DETECTORS.items():
        if type(detector) is cls:
            return key
    return type(detector).__name__.lower()


# ----------------------------------------------------------------------------------------------- model files
def save_model_file(path: str, model: torch.nn.Module, *, method: str, config: RunConfig, detector: str,
                    image_shape=None, num_classes=None) -> None:
    """Write a self-contained model file (the pickled module plus how it was made) for ``fastood eval``."""
    from fastood.model_files import save_model

    save_model(model, path, method=method, data=config.data, model=config.model, seed=config.seed, detector=detector,
               image_shape=None if image_shape is None else tuple(image_shape), num_classes=num_classes)


def load_model_file(path: str, factory=None) -> dict:
    """Read a model file (fastood's own, a ``torch.save(model)`` file, or a state_dict with ``factory``; see
    :func:`fastood.model_files.load_model`). It holds a pickled module: load only files you trust."""
    from fastood.model_files import ModelFileError, load_model

    try:
        return load_model(path, factory=factory)
    except ModelFileError as err:
        raise PipelineError(str(err)) from None


# ----------------------------------------------------------------------------------------------- reports
def save_sample_grid(images: torch.Tensor, path: str, nrow: int = 8) -> str:
    """Save images in [-1, 1] ([N, C, H, W]) as one PNG grid. Uses torchvision when installed, else matplotlib."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    images = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from torchvision.utils import save_image
    except ImportError:
        save_image = None
    if save_image is not None:
        save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = images[i]
    array = canvas.permute(1, 2, 0).numpy()
    plt.imsave(path, array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    return path


def results_table(reports: dict) -> str:
    """Rows = method / detector; columns = AUROC (%) on each OOD set, mean AUROC, mean FPR95, ID accuracy."""
    if not reports:
        return "(no results)"
    sets = list(next(iter(reports.values())).metrics)
    width = max(24, max(len(r) for r in reports) + 2)
    col = max(9, max(len(s) for s in sets) + 2)
    header = f"{'method / detector':{width}s}" + "".join(f"{s:>{col}s}" for s in sets) \
        + f"{'mean':>{col}s}{'FPR95':>9s}{'ID acc':>9s}"
    lines = ["AUROC (%) on each OOD set (higher is better); FPR95 = mean FPR at 95% TPR (lower is better)",
             header, "-" * len(header)]
    for row, r in reports.items():
        acc = "n/a" if r.id_accuracy is None else f"{100 * r.id_accuracy:.2f}"
        lines.append(f"{row:{width}s}" + "".join(f"{100 * r.metrics[s]['auroc']:{col}.2f}" for s in sets)
                     + f"{100 * r.average['auroc']:{col}.2f}{100 * r.average['fpr95']:9.2f}{acc:>9s}")
    return "\n".join(lines)


def write_report(out: str, reports: dict, meta: dict, samples: dict, plots: bool = True) -> dict:
    """Write results.json, results.csv, table.txt and (with ``plots``) the ROC curves and score histograms of every
    row. Returns {kind: [paths]}."""
    from fastood.evaluation import METRICS

    os.makedirs(out, exist_ok=True)
    written = {"json": [], "csv": [], "txt": [], "plots": [], "samples": list(samples.values())}
    rows = {}
    for row, r in reports.items():
        paths = r.plot(os.path.join(out, "plots"), prefix=f"{_slug(row)}-") if plots else []
        written["plots"] += paths
        rows[row] = dict(r.to_dict(), plots=[os.path.relpath(p, out) for p in paths])
    payload = dict(meta, rows=rows, samples={k: os.path.relpath(v, out) for k, v in samples.items()})
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    written["json"].append(path)
    path = os.path.join(out, "results.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "detector", "ood_set"] + list(METRICS) + ["id_accuracy"])
        for row, r in reports.items():
            for name, m in list(r.metrics.items()) + [("average", r.average)]:
                writer.writerow([row, r.detector, name] + [f"{m[k]:.6f}" for k in METRICS]
                                + ["" if r.id_accuracy is None else f"{r.id_accuracy:.6f}"])
    written["csv"].append(path)
    path = os.path.join(out, "table.txt")
    with open(path, "w") as f:
        f.write(results_table(reports) + "\n")
    written["txt"].append(path)
    return written


# ----------------------------------------------------------------------------------------------- the runs
def _budget(config: RunConfig, method: Method) -> dict:
    if config.steps is not None:
        return {"steps": config.steps}
    return {"epochs": config.epochs if config.epochs is not None else method.epochs}


def evaluate_rows(ctx: Context, detectors: dict) -> dict:
    """{row: detector} -> {row: Report} on the test sets (rank 0 only; other ranks get {})."""
    from fastood.evaluation import evaluate

    if not D.is_main_process():
        return {}
    id_loader, ood = ctx.test_loaders()
    reports = {}
    for row, detector in detectors.items():
        with ctx.timed(f"evaluate {row}"):
            reports[row] = evaluate(detector, id_loader, ood, progress=ctx.config.progress)
    return reports


def train_method(ctx: Context, name: str, model_path: str):
    """Build, train (resumable) and save one method. Returns (Built, the method's own detector)."""
    method = METHODS[name]
    if method.fine_tunes and ctx.config.pretrained is None:
        ctx.pretrained()  # pretrain (or load) before the method's own messages
    D.seed_everything(ctx.config.seed)  # new parameters (a grown or second head) do not depend on earlier methods
    built = method.build(ctx)
    budget = _budget(ctx.config, method)
    length = ", ".join(f"{v} {k}" for k, v in budget.items())
    ctx.say(f"training {method.label} ({method.paper}; {length}) -> {ctx.checkpoint_dir(name)}")
    D.seed_everything(ctx.config.seed, per_rank=True)  # per-rank outlier samples under DDP
    t0 = time.perf_counter()
    built.trainer.fit(ctx.train_loader, resume="auto" if ctx.config.resume else False, **budget)
    seconds = time.perf_counter() - t0
    ctx.timings[f"train {name}"] = round(seconds, 3)
    own = built.trainer.detector()
    if D.is_main_process():
        save_model_file(model_path, built.model, method=name, config=ctx.config, detector=_detector_key(own),
                        image_shape=ctx.shape, num_classes=ctx.num_classes)
    return built, own


def method_rows(ctx: Context, name: str, built: Built, own) -> dict:
    """``{"LABEL / DETECTOR": detector}`` of one trained method: its own detector, plus the ``--detectors`` choice
    (fitted / tuned on the model) or else the method's ``extra`` detectors of :data:`METHODS`."""
    from fastood.trainers.base import unwrap

    method = METHODS[name]
    model = unwrap(built.model)
    detectors = {f"{method.label} / {own.name}": own}
    if ctx.config.detectors is not None:  # demo --detectors: the chosen ones, fitted / tuned on this model
        chosen = [k for k in detector_names(ctx.config.detectors, own=_detector_key(own)) if k != _detector_key(own)]
        detectors.update(_named_detectors(ctx, method.label, chosen, model))
        return detectors
    for key in method.extra:
        det = make_detector(key, model)
        if type(det) is not type(own):
            detectors[f"{method.label} / {det.name}"] = det
    return detectors


def _named_detectors(ctx: Context, label: str, names, model) -> dict:
    """``{"LABEL / DETECTOR": detector}`` for ``names``, built (and fitted / tuned) by :func:`make_detector`; a
    detector the model does not support (TypeError / ValueError, e.g. ViM without a final linear layer) is left out
    with a message."""
    out = {}
    for key in names:
        try:
            det = make_detector(key, model, ctx)
        except (TypeError, ValueError) as err:
            ctx.say(f"{label}: skipping detector {key} ({type(err).__name__}: {err})")
            continue
        out[f"{label} / {det.name}"] = det
    return out


def _write_samples(ctx: Context, name: str, built: Built) -> dict:
    if built.samples is None or not D.is_main_process():
        return {}
    torch.manual_seed(ctx.config.seed)
    images = built.samples(ctx.config.grid)
    path = os.path.join(ctx.config.out, "samples", f"{name}.png")
    return {name: save_sample_grid(images, path, nrow=int(math.sqrt(ctx.config.grid)) or 1)}


def _meta(ctx: Context, command: str, total_s: float) -> dict:
    cfg = dataclasses.asdict(ctx.config)
    return {"command": command, "config": cfg, "timings_s": dict(ctx.timings, total=round(total_s, 3)),
            "device": str(ctx.device), "world_size": ctx.info.world_size, "torch": torch.__version__,
            "python": platform.python_version(), "ood_sets": list(ctx.bench.ood),
            "id_test_size": len(ctx.bench.id_test)}


def _check_methods(methods):
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")


def _checkpoint_dir(config: RunConfig, method: str) -> str:
    return os.path.join(config.out, "checkpoints", method)


def _check_fresh(config: RunConfig, methods) -> None:
    """``train`` without ``--resume`` refuses to overwrite an earlier run's checkpoint."""
    if config.resume:
        return
    existing = [_checkpoint_dir(config, m) for m in methods
                if os.path.exists(os.path.join(_checkpoint_dir(config, m), "checkpoint.pt"))]
    if existing:
        raise PipelineError(f"{existing[0]} holds the checkpoint of an earlier run: pass --resume to continue it, "
                            "or choose another --out")


def run_demo(config: RunConfig) -> dict:
    """The demo: pretrained baseline (MSP, Energy) vs each method after training, one table, a report folder.

    Without ``resume`` every method starts its training afresh (the pretrained classifier stays cached).
    Returns {row: Report} on rank 0 ({} on other ranks).
    """
    _check_methods(config.methods)
    start = time.perf_counter()
    ctx = Context(config)
    try:
        with ctx.timed("pretrain"):
            base = ctx.pretrained()
        if config.detectors is None:
            baseline = {f"pretrained / {det.name}": det for det in (make_detector("msp", base),
                                                                    make_detector("energy", base))}
        else:
            baseline = _named_detectors(ctx, "pretrained", detector_names(config.detectors), base)
        rows = evaluate_rows(ctx, baseline)
        samples = {}
        for name in config.methods:
            built, own = train_method(ctx, name, os.path.join(config.out, "models", f"{name}.pt"))
            rows.update(evaluate_rows(ctx, method_rows(ctx, name, built, own)))
            samples.update(_write_samples(ctx, name, built))
        if D.is_main_process():
            table = results_table(rows)
            meta = _meta(ctx, "demo", time.perf_counter() - start)
            write_report(config.out, rows, meta, samples, plots=config.plots)
            size = meta["id_test_size"] if config.eval_limit is None else f"<= {config.eval_limit} images per set"
            print(f"\n{config.data}: {', '.join(ctx.bench.ood)} vs ID test ({size})")
            print(table)
            print(f"\nreport: {os.path.abspath(config.out)} (results.json, results.csv, table.txt, plots/, samples/)"
                  f"   total {meta['timings_s']['total']:.0f} s")
        D.barrier()
        return rows
    finally:
        ctx.close()


def run_train(config: RunConfig) -> dict:
    """Train one method, save ``OUT/model.pt`` and write the report of its own detector (and MSP/Energy)."""
    _check_methods(config.methods)
    if len(config.methods) != 1:
        raise PipelineError(f"train runs one method, got {config.methods}")
    name = config.methods[0]
    _check_fresh(config, [name])
    start = time.perf_counter()
    ctx = Context(config)
    try:
        built, own = train_method(ctx, name, os.path.join(config.out, "model.pt"))
        rows = evaluate_rows(ctx, method_rows(ctx, name, built, own))
        samples = _write_samples(ctx, name, built)
        if D.is_main_process():
            write_report(config.out, rows, _meta(ctx, f"train {name}", time.perf_counter() - start), samples,
                         plots=config.plots)
            print(results_table(rows))
            print(f"\nmodel: {os.path.join(config.out, 'model.pt')}   report: {os.path.abspath(config.out)}")
        D.barrier()
        return rows
    finally:
        ctx.close()


def run_eval(path: str, detector: str = "auto", data: Optional[str] = None, batch_size: int = 256,
             device: str = "auto", seed: Optional[int] = None, out: Optional[str] = None, progress: bool = True,
             eval_limit: Optional[int] = None, plots: bool = True, factory=None, payload: Optional[dict] = None):
    """Evaluate a saved model (any file :func:`fastood.model_files.load_model` reads; ``factory`` for a state_dict,
    or an already loaded ``payload``) with one detector on a benchmark's test sets; write a report. Returns the
    Report. ``detector="all"``: every registered detector the model supports (see :func:`detector_names`), fitted
    on the benchmark's ID training data where needed, in one table; returns ``{row: Report}``."""
    from fastood.evaluation import evaluate

    payload = load_model_file(path, factory) if payload is None else payload
    det_name = (payload["detector"] or "msp") if detector == "auto" else detector
    if data is None and payload["data"] is None:
        raise PipelineError(f"{path} does not say which data it was trained on: pass --data NAME (a built-in "
                            "benchmark) or --id DIR --ood DIR ... (image folders)")
    config = RunConfig(methods=[payload["method"] or "model"], data=data or payload["data"],
                       model=payload["model"] or "smallcnn",
                       seed=(payload["seed"] or 0) if seed is None else seed, device=device, quiet=not progress,
                       eval_limit=eval_limit,
                       out=out or os.path.join(os.path.dirname(os.path.abspath(path)), f"eval-{det_name}"))
    ctx = Context(config)
    expected = payload.get("image_shape")
    if expected is not None and tuple(expected) != ctx.shape:
        raise PipelineError(f"the model was trained on {payload['data']} images of shape {tuple(expected)}, but "
                            f"--data {config.data} has images of shape {ctx.shape}; evaluate it on {payload['data']}")
    model = payload["module"].to(ctx.device).eval()
    id_loader, ood = ctx.test_loaders(batch_size)
    label = payload["method"] or "model"
    if det_name == "all":
        detectors = _named_detectors(ctx, label, detector_names("all", own=payload["detector"]), model)
    else:
        det = make_detector(det_name, model, ctx)
        detectors = {f"{label} / {det.name}": det}
    reports = {}
    for row, det in detectors.items():
        with ctx.timed(f"evaluate {row}"):
            reports[row] = evaluate(det, id_loader, ood, progress=progress)
    write_report(config.out, reports, dict(_meta(ctx, "eval", 0.0), model_file=os.path.abspath(path)), {},
                 plots=plots)
    print(results_table(reports) if det_name == "all" else next(iter(reports.values())).table())
    print(f"\nreport: {os.path.abspath(config.out)}")
    return reports if det_name == "all" else next(iter(reports.values()))
