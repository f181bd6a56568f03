"""Gaussian classification head of ICE (Wu et al., AAAI 2023)."""
import torch
from torch import nn


class GaussianHead(nn.Module):
    """``h_i(z) = -||L^-1 (z - m_i)||^2`` for trainable class means m [C, F] and a shared lower-triangular L
    with positive diagonal (parametrized as a strictly lower part plus a log-diagonal).

    ``forward(z [B, F]) -> h [B, C]`` (all h <= 0; the logits of ICE's softmax). L^-1 is applied with a triangular
    solve, never an explicit inverse.
    """

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.means = nn.Parameter(torch.randn(num_classes, feat_dim) * 0.1)
        self.lower = nn.Parameter(torch.zeros(feat_dim, feat_dim))
        self.log_diag = nn.Parameter(torch.zeros(feat_dim))

    @property
    def scale_tril(self) -> torch.Tensor:
        """L [F, F]: strictly lower part of ``lower`` plus ``exp(log_diag)`` on the diagonal."""
        return torch.tril(self.lower, diagonal=-1) + torch.diag(torch.exp(self.log_diag))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.feat_dim:
            raise ValueError(f"z must have shape [B, {self.feat_dim}], got {tuple(z.shape)}")
        diff = z.unsqueeze(1) - self.means.unsqueeze(0)                     # [B, C, F]
        flat = diff.reshape(-1, self.feat_dim).T                            # [F, B*C]
        white = torch.linalg.solve_triangular(self.scale_tril, flat, upper=False)
        return -(white * white).sum(0).reshape(z.shape[0], self.num_classes)

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4) -> "GaussianHead":
        """Means = class feature means; L = Cholesky factor of the tied (within-class) covariance + ridge * I."""
        features, labels = features.double(), labels.long()
        means = torch.stack([features[labels == c].mean(0) for c in range(self.num_classes)])
        centered = features - means[labels]
        cov = centered.T @ centered / max(1, features.shape[0])
        cov += ridge * (cov.diagonal().mean() + 1e-12) * torch.eye(self.feat_dim, dtype=cov.dtype)
        chol = torch.linalg.cholesky(cov)
        self.means.copy_(means.to(self.means.dtype))
        self.lower.copy_(torch.tril(chol, -1).to(self.lower.dtype))
        self.log_diag.copy_(torch.log(chol.diagonal()).to(self.log_diag.dtype))
        return self


class GaussianClassifier(nn.Module):
    """``backbone`` features followed by a :class:`GaussianHead`: images -> h [B, C]."""

    def __init__(self, backbone: nn.Module, head: GaussianHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.backbone(x))
