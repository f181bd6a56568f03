"""Gaussian classification head of ICE (Wu et al., AAAI 2023) and a classifier built on it."""
import torch
from torch import nn

from fastood._modes import eval_mode

from ._checks import positive_int


class GaussianHead(nn.Module):
    """Class scores ``h_i(z) = -||L^-1 (z - m_i)||^2`` (ICE, the log of an unnormalized Gaussian density with
    tied covariance ``Sigma = L L^T``, up to a factor 2).

    ``forward(z [B, F]) -> h [B, C]``: ``h <= 0`` everywhere and ``h_i = 0`` when ``z = m_i``; higher h = more
    in-distribution for class i (ICE's OOD score is ``-max_i h_i``, higher = more OOD).

    Parametrization. ``L = R K`` and ``m_i = R mu_i``, where ``R`` (``reference_tril``, a buffer) is a fixed
    lower-triangular reference factor and the trainable parameters live in the frame it whitens:
    ``K = tril(lower, -1) + diag(exp(log_diag))`` (lower triangular, positive diagonal, unconstrained
    parameters) and ``means`` = ``mu`` [C, F]. A fresh head has ``R = I`` (so ``means`` are the class means,
    ``L = K``), means ~ N(0, 0.1^2) and ``K = I``. :meth:`init_from_features` sets ``R`` to the Cholesky factor of
    the features' tied covariance, ``K = I`` and ``mu = R^-1 (class means)``. Training then moves ``K`` and ``mu``
    at the scale of whitened features: with the raw factor as parameter, a feature of standard deviation sigma
    gives gradients and curvature of order 1/sigma^2 (near-dead ReLU units have sigma ~ 1e-3), and SGD at
    fine-tuning learning rates diverges within a few steps. ``scale_tril`` (= ``L``) and ``class_means``
    (= ``m``) give the model in feature space.

    ``L^-1`` is applied with triangular solves (``torch.linalg.solve_triangular``), never an explicit inverse; h
    is a sum of squares of whitened differences, so it stays <= 0 with finite gradients at ``z = m_i`` (no square
    root, no cancellation). Computed in the parameters' dtype with autocast off (triangular solves have no
    half-precision kernels); NaN/Inf in ``z`` give NaN/Inf in the matching rows of h.
    """

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        feat_dim, num_classes = positive_int("feat_dim", feat_dim), positive_int("num_classes", num_classes)
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.means = nn.Parameter(torch.randn(num_classes, feat_dim) * 0.1)
        self.lower = nn.Parameter(torch.zeros(feat_dim, feat_dim))
        self.log_diag = nn.Parameter(torch.zeros(feat_dim))
        self.register_buffer("reference_tril", torch.eye(feat_dim))

    @property
    def inner_tril(self) -> torch.Tensor:
        """K [F, F]: the strictly lower part of ``lower`` plus ``exp(log_diag)`` on the diagonal."""
        return torch.tril(self.lower, diagonal=-1) + torch.diag(torch.exp(self.log_diag))

    @property
    def scale_tril(self) -> torch.Tensor:
        """L = R K [F, F], lower triangular with a positive diagonal."""
        return self.reference_tril @ self.inner_tril

    @property
    def class_means(self) -> torch.Tensor:
        """The class means m = R mu [C, F] in feature space."""
        return self.means @ self.reference_tril.T

    @property
    def covariance(self) -> torch.Tensor:
        """The tied covariance ``Sigma = L L^T`` [F, F]."""
        L = self.scale_tril
        return L @ L.T

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a tensor [B, {self.feat_dim}], got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.feat_dim:
            raise ValueError(f"z must have shape [B, {self.feat_dim}], got {tuple(z.shape)}")
        if z.device != self.means.device:
            raise ValueError(f"z is on {z.device} but the GaussianHead is on {self.means.device}; move one of them")
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = self.means.dtype
            # u = R^-1 z, then L^-1 (z - m_i) = K^-1 (u - mu_i): whiten u and mu with one solve.
            u = torch.linalg.solve_triangular(self.reference_tril.to(dtype), z.to(dtype).T, upper=False)  # [F, B]
            rhs = torch.cat([u, self.means.T], dim=1)                                                    # [F, B+C]
            white = torch.linalg.solve_triangular(self.inner_tril, rhs, upper=False).T                   # [B+C, F]
            diff = white[: z.shape[0]].unsqueeze(1) - white[z.shape[0]:].unsqueeze(0)                    # [B, C, F]
            return -diff.pow(2).sum(-1)                                                                  # [B, C]

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4,
                           scale=1.0) -> "GaussianHead":
        """Start from the class means of ``features`` and the Cholesky factor of their tied (within-class,
        maximum-likelihood) covariance ``Sigma + ridge * mean(diag Sigma) * I``, times ``scale``: sets
        ``reference_tril`` to that factor, ``K = I`` and ``means`` to the whitened class means, so ``class_means``
        are the class means and ``covariance`` is the (scaled) ridged covariance.

        Args:
            features: [N, F] features of labeled ID training images (any float dtype and device).
            labels: [N] integer labels in ``0..num_classes-1``; every class needs at least one sample.
            ridge: relative diagonal loading that keeps the factor well conditioned (>= 0).
            scale: a number > 0 multiplying the covariance (h is divided by it), or ``"median"``: the covariance is
                scaled so that the median training feature has ``h_y = -1`` (squared Mahalanobis distance 1 to its
                class mean; in-distribution probability ``exp(h_y) = 0.37``). With scale 1, ``-h_y`` of an ID
                feature is about its dimension F (a chi-square), so ``exp(max_i h_i)`` is ~0 for every input and
                ICE's outlier term ``-log(1 - exp(max_i h_i(z_out)))`` has no gradient (see
                :class:`fastood.trainers.ICETrainer`).
        Computed in float64. Returns ``self``; ``self.init_scale`` holds the scale applied (a float).
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor [N, {self.feat_dim}], got {got}")
        labels = torch.as_tensor(labels, device=features.device)
        if labels.shape != (features.shape[0],) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers of shape [{features.shape[0]}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        if not (scale == "median" or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                      and 0 < scale < float("inf"))):
            raise ValueError(f"scale must be a finite number > 0 or 'median', got {scale!r}")
        features, labels = features.double(), labels.long()
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or Inf")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got values in "
                             f"{int(labels.min())}..{int(labels.max())}")
        counts = torch.bincount(labels, minlength=self.num_classes)
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"init_from_features: classes {missing} have no sample")
        sums = torch.zeros(self.num_classes, self.feat_dim, dtype=torch.float64, device=features.device)
        means = sums.index_add_(0, labels, features) / counts.unsqueeze(1)
        centered = features - means[labels]
        cov = centered.T @ centered / features.shape[0]
        cov += ridge * (cov.diagonal().mean() + 1e-12) * torch.eye(self.feat_dim, dtype=cov.dtype, device=cov.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.item() != 0:
            raise ValueError("init_from_features: the feature covariance is singular; use a ridge > 0")
        if scale == "median":
            white = torch.linalg.solve_triangular(chol, centered.T, upper=False)          # [F, N]
            scale = float(white.pow(2).sum(0).median().clamp_min(1e-12))
        chol = chol * float(scale) ** 0.5
        self.init_scale = float(scale)
        self.reference_tril.copy_(chol)
        self.means.copy_(torch.linalg.solve_triangular(chol, means.T, upper=False).T)
        self.lower.zero_()
        self.log_diag.zero_()
        return self


class GaussianClassifier(nn.Module):
    """``backbone`` features followed by a :class:`GaussianHead`: images [B, ...] -> h [B, C] (all <= 0).

    ``features(x)`` -> [B, F]. ``softmax(h)`` gives the class probabilities of ICE; ``-max_i h_i`` is its OOD
    score (higher = more OOD, :class:`fastood.detectors.ICELikelihood`).
    """

    def __init__(self, backbone: nn.Module, head: GaussianHead):
        super().__init__()
        if not isinstance(head, GaussianHead):
            raise TypeError(f"head must be a GaussianHead, got {type(head).__name__}")
        self.backbone, self.head = backbone, head

    @classmethod
    def from_model(cls, model: nn.Module) -> "GaussianClassifier":
        """The feature extractor of a linear classifier (:func:`fastood.models.split_head`, shared, not copied)
        with a new :class:`GaussianHead` of the same size, dtype and device in place of its linear head. Call
        :meth:`init_from_loader` to start the head from the features' class statistics."""
        from .heads import split_head

        backbone, linear = split_head(model)
        head = GaussianHead(linear.in_features, linear.out_features).to(linear.weight)
        return cls(backbone, head)

    @torch.no_grad()
    def init_from_loader(self, loader, ridge: float = 1e-4, scale=1.0) -> "GaussianClassifier":
        """:meth:`GaussianHead.init_from_features` (``ridge``, ``scale``) on the backbone's features (eval mode) of a
        labeled loader yielding ``(images, labels)``; batches go to the head's device. Returns ``self``."""
        device = self.head.means.device
        feats, labels = [], []
        with eval_mode(self.backbone):  # restores each submodule's own flag (a BatchNorm the user froze stays so)
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("init_from_loader needs a labeled loader yielding (images, labels)")
                feats.append(self.backbone(batch[0].to(device)).double())
                labels.append(torch.as_tensor(batch[1], device=device).reshape(-1))
        if not feats:
            raise ValueError("init_from_loader: the loader yielded no batch")
        self.head.init_from_features(torch.cat(feats), torch.cat(labels), ridge=ridge, scale=scale)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
