"""Stage 2 of CMG (Wang et al., ECML 2022): fine-tune a trained classifier's head on cached features against
class-mixed pseudo-OOD images, with the feature extractor frozen."""
import math
import warnings

import torch
from torch import nn

from fastood._modes import eval_mode
from fastood._stack import user_stacklevel
from fastood.losses import cmg_energy_loss  # noqa: F401 (re-exported: fastood.trainers.cmg.cmg_energy_loss)
from fastood.losses import energy as energy_score  # noqa: F401  (also re-exported: fastood.trainers.cmg.energy_score)
from fastood.objectives.cmg import MODES, CMGObjective

from .base import Trainer, broadcast_from_rank0, delegated, first_item, rank, unwrap
from .manifold import grow_head, grow_linear

TRAIN = ("last_layer", "head")
_HEAD_MODULES = (nn.Linear, nn.Flatten, nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.ReLU, nn.LeakyReLU, nn.GELU,
                 nn.SiLU, nn.ELU, nn.Tanh)


class FeatureClassifier(nn.Module):
    """``head(backbone(x))``: a classifier on images made of a feature extractor and a head.

    ``forward(x)`` -> logits [B, C] from images; ``forward(f, from_features=True)`` -> ``head(f)`` from features
    [B, F] (so a trainer can run the head alone through a DDP wrapper).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs, from_features: bool = False):
        return self.head(inputs if from_features else self.backbone(inputs))


class _Flatten(nn.Sequential):
    def forward(self, x):
        return torch.flatten(super().forward(x), 1)


def mlp_head_split(model: nn.Module):
    """``(backbone, head)`` with ``head`` = the fully connected tail of ``model``: the trailing Linear / activation /
    Dropout / Flatten / BatchNorm1d modules of an ``nn.Sequential`` model, or of the ``body`` Sequential of a model
    with ``body`` + final ``fc`` (e.g. :class:`fastood.models.SmallCNN`: pooled conv features -> Linear -> ReLU ->
    Dropout -> fc). The modules are the model's own (training the head trains the model)."""
    if isinstance(model, nn.Sequential):
        seq, tail = model, []
    elif isinstance(getattr(model, "body", None), nn.Sequential) and isinstance(getattr(model, "fc", None), nn.Linear):
        seq, tail = model.body, [model.fc]
    else:
        raise TypeError(f"train='head' cannot find the fully connected head of {type(model).__name__}: it works for "
                        "nn.Sequential models and models with a `body` Sequential and an `fc` layer; pass "
                        "split=(backbone, head) instead")
    k = len(seq)
    while k > 0 and isinstance(seq[k - 1], _HEAD_MODULES):
        k -= 1
    if k == 0:
        raise TypeError(f"train='head': {type(model).__name__} has no feature extractor before its fully connected "
                        "layers; pass split=(backbone, head)")
    return _Flatten(*list(seq)[:k]), nn.Sequential(*list(seq)[k:], *tail)


def _grow_split_head(head: nn.Module) -> nn.Module:
    """The head with one more output: a grown nn.Linear, or an nn.Sequential whose last Linear is grown in place."""
    if isinstance(head, nn.Linear):
        return grow_linear(head, 1)
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        head[len(head) - 1] = grow_linear(head[-1], 1)
        return head
    raise TypeError(f"mode='softmax' adds an output to the head's final nn.Linear; the head given is a "
                    f"{type(head).__name__} that does not end in one")


def loader_augments(loader, items=2) -> bool:
    """Whether ``loader.dataset`` returns different images for the same item on two loads (the first ``items``
    items, each loaded twice): a sign of random augmentation. False when the loader has no indexable dataset."""
    dataset = getattr(loader, "dataset", None)
    try:
        n = min(items, len(dataset))
    except TypeError:
        return False
    for index in range(n):
        first, second = first_item(dataset[index]), first_item(dataset[index])
        if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
            if first.shape != second.shape or not torch.equal(first, second):
                return True
    return False


class _FeatureBatches:
    """Shuffled mini-batches ``(features, labels)`` of cached tensors; the permutation comes from torch's default
    CPU generator when iteration starts (the Trainer seeds it per epoch)."""

    def __init__(self, features, labels, batch_size):
        self.features, self.labels, self.batch_size = features, labels, batch_size

    def __len__(self):
        return math.ceil(self.features.shape[0] / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.features.shape[0]).to(self.features.device)
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.features[idx], self.labels[idx]


class CMGTrainer(Trainer):
    """CMG stage 2: fine-tune the head of a trained classifier against class-mixed pseudo-OOD images.

    Design (Wang et al., ECML 2022):

    - The classifier is split into a feature extractor and a head. ``train="last_layer"`` (default): the head is
      the final ``nn.Linear`` (:func:`fastood.models.split_head`); ``train="head"``: the fully connected tail
      (:func:`mlp_head_split`), or any ``split=(backbone, head)`` you give. The extractor is frozen: its
      parameters get ``requires_grad=False`` for good, it stays in eval mode (BatchNorm running statistics are
      never updated) and the optimizer only sees the head's parameters.
    - ID features ``backbone(x)`` of the whole training loader are computed ONCE when :meth:`fit` starts and cached
      on the training device; stage 2 then iterates shuffled mini-batches of the cached features (the
      ``loader``'s batch size unless ``batch_size`` is given): no backbone pass per step.
    - Pseudo-OOD: at the start of every epoch ``ceil(ood_ratio * N_id)`` images are drawn from the sampler
      (default :class:`~fastood.samplers.class_mix.ClassMixSampler` around ``cvae``: ``g(z, k e_i + (1 - k) e_j)``)
      and passed once through the frozen extractor; each step takes the next ``round(ood_ratio * b)`` of them.
      Their random stream is seeded by ``(seed, epoch, rank)``, so a resumed run draws the same pool and, under
      DDP, every rank draws its own (with one pool for all ranks, N ranks would see the same pseudo-OOD images
      N times per step).
    - ``mode="energy"`` (CMG-energy): the head keeps n outputs; loss :func:`cmg_energy_loss` with ``lam`` (0.1),
      ``T`` (1) and margins ``m_in`` / ``m_out`` = the ``quantiles`` (20th / 80th percentile,
      ``torch.quantile``) of the ID / pseudo-OOD energies under the *pretrained* head, measured once before the
      first step (on all cached ID features and the first epoch's pool) and checkpointed; or fixed by
      ``margins=(m_in, m_out)``. Detector: :class:`~fastood.detectors.Energy` (``E = -T logsumexp(f/T)``, higher
      = more OOD).
    - ``mode="softmax"`` (CMG-softmax): the head's final ``nn.Linear`` grows an (n+1)-th "OOD" output (trained
      rows kept; in place on ``model`` for the automatic splits); loss = CE over the joint batch, pseudo-OOD
      labeled n. Detector: :class:`~fastood.detectors.ExtraClass` (probability of class n+1).
    - The detector runs on images: :attr:`classifier` = ``head(backbone(x))`` (a :class:`FeatureClassifier`).
      With the automatic splits the head modules are ``model``'s own, so ``model`` itself is fine-tuned too.
    - The step is :class:`fastood.objectives.CMGObjective` (``trainer.objective``, called on the head and cached
      features; ``mode``, ``lam``, ``T``, ``m_in`` and ``m_out`` are its attributes).
    - After :meth:`fit` the model's train/eval modes are as ``fit`` found them, except the frozen extractor's, which
      stays in eval mode.
    - Optimizer: Adam, lr 1e-4, no weight decay (paper and authors: shaoyijia/CMG ``training/fine_tune.py``,
      ``torch.optim.Adam(..., lr=0.0001)``, 15 epochs, ~7,000 steps on full MNIST). It moves the head slowly: on
      mnist5k-0to4 (2,000 images, 93 steps, 3 seeds, bench/quality_cvae.py) CMG-softmax scored 63.7 mean AUROC
      against 88.9 with the former default, SGD lr 0.01 (momentum 0.9, wd 5e-4), and 72.1 after the paper's 15
      epochs (465 steps); near-OOD AUROC was the same (93.4-93.8). With few steps pass a larger ``lr``; see
      docs/fidelity.md.
    - The ID features are cached once: an augmenting loader (random transforms, different images on every pass)
      is frozen into one draw. :meth:`fit` warns when two loads of the same dataset items differ.

    Mechanism check (energy mode): ``id_inside`` / ``ood_inside`` = fraction of the batch's ID energies at or
    below ``m_in`` / pseudo-OOD energies at or above ``m_out`` (inside their margins: no regularizer gradient).
    It warns (:class:`~fastood.trainers.MechanismIdleWarning`) when every energy was inside its margin from the
    run's first step through an epoch (the regularizer was 0 at every step: stage 2 was plain cross-entropy), or
    when ``lam`` is 0.

    Args:
        model: a trained n-class classifier (logits [B, n]).
        cvae: a trained :class:`~fastood.models.ConditionalVAE` (wrapped in ``ClassMixSampler(cvae, sigma)``) or
            any sampler ``sample(model, n, shape)``.
        mode: ``"energy"`` or ``"softmax"``.
        lam, T: energy-loss weight (0.1) and temperature (1).
        train: ``"last_layer"`` or ``"head"`` (ignored when ``split`` is given).
        split: optional ``(backbone, head)`` modules with ``head(backbone(x))`` = the logits.
        quantiles: ``(q_in, q_out)`` of the margins (0.2, 0.8).
        margins: optional fixed ``(m_in, m_out)`` (energy mode).
        ood_ratio: pseudo-OOD images per ID image (> 0; default 1).
        sigma: the default sampler's latent std (CMG: 5).
        batch_size: stage-2 mini-batch size (default: the loader's, else 128).
        sample_batch: images generated and passed through the extractor at once.
        weight_decay: Adam's weight decay (default 0, the paper's).
        **kwargs: the Trainer options (lr, optimizer, checkpoint_dir, progress, seed, ...).

    Adam with lr 1e-4 by default. ``history`` logs ``loss``, ``ce``, ``acc``, and ``reg``, ``energy_id``,
    ``energy_ood``, ``id_inside``, ``ood_inside`` (energy mode) or ``ood_rejected`` (softmax mode).
    """

    default_lr = 1e-4
    progress_keys = ("loss", "acc", "id_inside", "ood_inside", "ood_rejected")
    mode = delegated("mode")
    lam = delegated("lam")
    T = delegated("T")
    m_in = delegated("m_in")
    m_out = delegated("m_out")

    def __init__(self, model, cvae, mode="energy", lam=0.1, T=1.0, train="last_layer", split=None,
                 quantiles=(0.2, 0.8), margins=None, ood_ratio=1.0, sigma=5.0, batch_size=None, sample_batch=256,
                 weight_decay=0.0, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if train not in TRAIN:
            raise ValueError(f"train must be one of {TRAIN}, got {train!r}")
        for name, value in (("lam", lam), ("T", T), ("ood_ratio", ood_ratio)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if T <= 0 or ood_ratio <= 0:
            raise ValueError(f"T and ood_ratio must be > 0, got T={T!r}, ood_ratio={ood_ratio!r}")
        q_in, q_out = self._pair(quantiles, "quantiles")
        if not (0 <= q_in <= 1 and 0 <= q_out <= 1):
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        if margins is not None:
            margins = self._pair(margins, "margins")
        for name, value in (("batch_size", batch_size), ("sample_batch", sample_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        if split is not None:
            if not (isinstance(split, (tuple, list)) and len(split) == 2
                    and all(isinstance(m, nn.Module) for m in split)):
                raise TypeError("split must be a pair (backbone, head) of nn.Modules")
            backbone, head = split
            if mode == "softmax":
                head = _grow_split_head(head)
        else:
            if mode == "softmax":
                grow_head(model, 1)
            if train == "last_layer":
                from fastood.models import split_head

                backbone, head = split_head(model)
            else:
                backbone, head = mlp_head_split(model)
        self.classifier = FeatureClassifier(backbone, head)
        super().__init__(self.classifier, weight_decay=weight_decay, **kwargs)
        head_ids = {id(p) for p in head.parameters()}
        if not head_ids:
            raise ValueError("the head has no parameters to train")
        for p in backbone.parameters():
            if id(p) not in head_ids:
                p.requires_grad_(False)
        self.backbone, self.head = backbone, head
        self.sampler = self._make_sampler(cvae, sigma)
        m_in, m_out = (None, None) if margins is None else margins
        self.objective = CMGObjective(mode, m_in=m_in, m_out=m_out, lam=lam, T=T)
        self.objective.owner = type(self).__name__
        self.quantiles, self.ood_ratio = (q_in, q_out), float(ood_ratio)
        self.batch_size, self.sample_batch = batch_size, sample_batch
        self.id_features = self.id_labels = None
        self._pool, self._pool_epoch, self._image_shape = None, None, None

    @staticmethod
    def _pair(value, name):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise ValueError(f"{name} must be a pair of numbers, got {value!r}")
        a, b = (float(v) for v in value)
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return a, b

    @staticmethod
    def _make_sampler(cvae, sigma):
        from fastood.samplers.class_mix import ClassMixSampler

        if isinstance(cvae, nn.Module):
            return ClassMixSampler(cvae, sigma=sigma)
        if not callable(getattr(cvae, "sample", None)):
            raise TypeError(f"cvae must be a ConditionalVAE or a sampler with sample(model, n, shape), got "
                            f"{type(cvae).__name__}")
        return cvae

    # ------------------------------------------------------------------ frozen feature extractor
    def trainable_parameters(self):
        """Only the head's parameters."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def configure_optimizer(self):
        """Adam over the head (lr 1e-4, weight decay 0 by default: the paper's and the authors' stage 2)."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, F] of images x from the frozen extractor (eval mode; each module's mode restored)."""
        with eval_mode(self.backbone):
            return self.backbone(x.to(self.device)).flatten(1)

    def cache_id_features(self, loader):
        """Compute and keep ``backbone(x)`` and the labels of every batch ``(x, y)`` of ``loader`` (once), in an
        order fixed by the trainer's seed (a shuffling loader is iterated under it), so that a resumed run caches
        the same order and its seeded feature batches pick the same samples."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + 104_729)
            cached = self._cache_id_features(loader)
            if loader_augments(loader):
                warnings.warn(
                    "CMGTrainer caches the ID features once, but the loader's dataset returns different images for "
                    "the same item on two loads (random augmentation?): stage 2 trains on one frozen draw of the "
                    "augmentation. Pass a loader without random transforms to make that explicit.",
                    UserWarning, stacklevel=user_stacklevel())
            return cached

    def _cache_id_features(self, loader):
        feats, labels = [], []
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("CMGTrainer needs labeled ID batches (x, y)")
            x = first_item(batch)
            if x.shape[0] == 0:
                continue
            if not bool(torch.isfinite(x).all()):
                raise ValueError("CMGTrainer: the ID loader yielded NaN/Inf images")
            self._image_shape = tuple(x.shape[1:])
            feats.append(self.features(x))
            labels.append(torch.as_tensor(batch[1]).to(self.device).long())
        if not feats:
            raise ValueError("loader is empty: it yields no images")
        features, labels = torch.cat(feats), torch.cat(labels)
        with torch.no_grad(), eval_mode(self.head):
            outputs = self.head(features[:1]).shape[1]
        n_id = outputs - 1 if self.mode == "softmax" else outputs
        if int(labels.min()) < 0 or int(labels.max()) >= n_id:
            raise ValueError(f"labels must lie in [0, {n_id - 1}] (the head has {outputs} outputs"
                             f"{', the last one the OOD class' if self.mode == 'softmax' else ''}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.id_features, self.id_labels = features, labels
        return self.id_features, self.id_labels

    # ------------------------------------------------------------------ pseudo-OOD pool
    def _pool_size(self):
        return max(1, math.ceil(self.ood_ratio * self.id_features.shape[0]))

    def _make_pool(self, epoch):
        """Draw this epoch's pseudo-OOD images (seeded by (seed, epoch)) and keep their features."""
        # every CUDA device: manual_seed below reseeds them all, and fork_rng restores only those listed
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        model = unwrap(self.model)
        n, feats = self._pool_size(), []
        with torch.random.fork_rng(devices=devices):
            # per rank: under DDP each rank draws its own pseudo-OOD images (rank 0 keeps the single-process pool)
            torch.manual_seed(self.seed * 1_000_003 + epoch + 7_919 + 15_485_863 * rank())
            for start in range(0, n, self.sample_batch):
                m = min(self.sample_batch, n - start)
                images = self.sampler.sample(model, m, self._image_shape)
                feats.append(self.features(images.to(device=self.device, dtype=self.id_features.dtype)))
        self._pool, self._pool_epoch = torch.cat(feats), epoch

    def ood_features(self, epoch=None):
        """The pseudo-OOD features [P, F] of ``epoch`` (default: the current one), generating them if needed."""
        epoch = self.epoch if epoch is None else epoch
        if self._pool_epoch != epoch:
            self._make_pool(epoch)
        return self._pool

    # ------------------------------------------------------------------ training
    def fit(self, loader, epochs=None, steps=None, resume="auto"):
        """Cache the ID features of ``loader`` (first call only), then train the head on them; see the class doc.
        ``epochs`` count passes over the cached features."""
        if self.id_features is None:
            self.cache_id_features(loader)
        batch_size = self.batch_size or getattr(loader, "batch_size", None) or 128
        try:
            return super().fit(_FeatureBatches(self.id_features, self.id_labels, batch_size), epochs=epochs,
                               steps=steps, resume=resume)
        finally:
            self.backbone.eval()  # frozen for good (fit restored the modes it found)

    @torch.no_grad()
    def measure_margins(self):
        """``(m_in, m_out)``: the ``quantiles`` of the energies of all cached ID features and of the current epoch's
        pseudo-OOD features under the current head (eval mode). Stored on the trainer."""
        with eval_mode(self.head):
            margins = self.objective.margins_from(self.head(self.id_features), self.head(self.ood_features()),
                                                  self.quantiles)
        self.m_in, self.m_out = broadcast_from_rank0(*margins)
        return self.m_in, self.m_out

    def on_fit_start(self, loader):
        self.backbone.eval()
        if self.mode == "energy" and self.m_in is None:
            self.measure_margins()

    def training_step(self, batch):
        self.backbone.eval()  # the Trainer puts the whole model in train mode before each step
        f_id, y = batch
        pool = self.ood_features()
        nominal = self.batch_size or f_id.shape[0]
        g = max(1, int(round(self.ood_ratio * f_id.shape[0])))
        start = self.batch_in_epoch * max(1, int(round(self.ood_ratio * nominal)))
        f_ood = pool[(torch.arange(g, device=pool.device) + start) % pool.shape[0]]
        loss, logs = self.objective(lambda f: self.net(f, from_features=True), f_id, y, f_ood)
        return {**logs, "loss": loss}

    def mechanism_idle(self, logs):
        if self.mode != "energy":
            return None
        if self.lam == 0:
            return ("lam = 0: the energy regularizer is off and stage 2 is plain cross-entropy on the head; the "
                    "paper uses lam = 0.1")
        # idle = inside the margins from the run's first step on (a regularizer that fell to 0 after training
        # pushed the energies across the margins did its job)
        inside = [min(h.get("id_inside", 0.0), h.get("ood_inside", 0.0)) for h in self.history[:1] + list(logs)]
        if inside and min(inside) >= 1.0:
            return (f"every ID energy stayed below m_in = {self.m_in:.3g} and every pseudo-OOD energy above m_out = "
                    f"{self.m_out:.3g} at every step: the energy regularizer was 0 and stage 2 was plain "
                    "cross-entropy. The paper's margins are the 20th / 80th percentiles measured before stage 2 "
                    "(margins=None, quantiles=(0.2, 0.8)); fixed margins this loose do nothing")
        return None

    def detector(self):
        """Energy of :attr:`classifier` (energy mode) or its OOD-class probability (softmax mode); higher = more OOD."""
        from fastood.detectors import Energy, ExtraClass

        return Energy(self.classifier, T=self.T) if self.mode == "energy" else ExtraClass(self.classifier)

    def extra_state(self):
        return {**super().extra_state(), "m_in": self.m_in, "m_out": self.m_out}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if "m_in" in state:
            self.m_in, self.m_out = state["m_in"], state["m_out"]
