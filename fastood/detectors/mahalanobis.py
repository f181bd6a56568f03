"""Mahalanobis detector (Lee, Lee, Lee, Shin, NeurIPS 2018): class-conditional Gaussians with one tied covariance,
fitted on pooled features of chosen layers."""
import warnings

import torch

from ._feature_hooks import PENULTIMATE, forward_with_taps, is_logits, pool_features, resolve_layers
from ._perturbation import InputPerturbation
from .base import Detector, eval_mode


def whitening(cov: torch.Tensor, zero_message: str) -> torch.Tensor:
    """W [F, R] with ``W W^T = pinv(cov)`` for a symmetric PSD float64 ``cov`` [F, F], R = its numerical rank
    (eigenvalues below ``max |eig| * F * eps`` dropped); ValueError(zero_message) when R = 0."""
    cov = 0.5 * (cov + cov.T)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    tol = eigvals.abs().max() * cov.shape[0] * torch.finfo(torch.float64).eps
    keep = eigvals > tol
    if not keep.any():
        raise ValueError(zero_message)
    return eigvecs[:, keep] / eigvals[keep].sqrt()


class Mahalanobis(InputPerturbation, Detector):
    """score = ``sum_l min_c (z_l - mu_{l,c})^T Sigma_l^+ (z_l - mu_{l,c})`` (paper Eq. 2, summed over layers l;
    higher = more OOD), for pooled features z_l of the chosen layers, class means mu_{l,c} and the tied
    within-class covariance Sigma_l (pseudo-inverse ``+`` for rank-deficient features).

    Args:
        model: the classifier (its output is used only for ``predict_class``, so any model works for scoring).
        layers: names of submodules (as in ``model.named_modules()``) whose outputs are globally average-pooled
            into features; default None = the input of the final linear layer (the penultimate features, found
            with :func:`fastood.models.split_head`). A module called several times in one forward pass
            contributes its last call.
        epsilon: input perturbation (paper Eq. 4), per layer: ``x^_l = x - epsilon * sign(grad_x d_l(x))`` with
            ``d_l`` the distance to the closest class, then layer l is scored at ``x^_l``; 0 = off.

    ``fit(loader)`` streams labeled ID training data once and keeps only per-class feature sums and one second
    moment per layer (float64, O(classes * F + F^2) memory, independent of the number of images). Classes with
    no training samples (e.g. the outlier class of an n+1 classifier) are left out of the minimum.
    After fitting: ``classes`` [K], ``means`` (per layer [K, F]), ``precisions`` (per layer [F, F]).
    ``predict_class`` is the model's argmax when it returns logits [B, C], else None.
    """

    hyperparameters = ("epsilon",)

    def __init__(self, model, layers=None, epsilon: float = 0.0, **batch_options):
        super().__init__(model, **batch_options)
        self.epsilon = epsilon
        self._check_hyperparameters()
        self._targets = resolve_layers(model, layers, "Mahalanobis")
        self.layers = [name for name, _, _ in self._targets]
        self.classes = None     # [K] class indices that had training samples
        self.means = None       # per layer [K, F]
        self.precisions = None  # per layer [F, F]
        self._whiten = None     # per layer W [F, R] with W W^T = Sigma^+
        self._white_means = None  # per layer mu W [K, R]

    @property
    def name(self) -> str:
        """``Mahalanobis(epsilon=...)``, plus the layer names when they are not the default."""
        base = super().name
        return base if self.layers == [PENULTIMATE] else f"{base[:-1]}, layers={self.layers})"

    # ------------------------------------------------------------------ features
    def _features(self, x):
        """(per-layer pooled features [B, F_l] float64, model output) from one forward pass."""
        feats, output = forward_with_taps(self.model, x, self._targets, type(self).__name__)
        return [pool_features(f, type(self).__name__) for f in feats], output

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "Mahalanobis":
        """Class means and tied covariance of each layer from a labeled ID loader yielding (images, labels)."""
        counts, sums, second, shift = self._stream_moments(loader, progress)
        self._fit_gaussians(counts, sums, second, shift)
        return self

    def _stream_moments(self, loader, progress: bool):
        """One pass over labeled ID data: ``(counts [K], per layer class sums [K, F], second moment [F, F], shift
        [F])``, float64, the features taken around ``shift`` (the first batch's mean)."""
        from tqdm.auto import tqdm

        who = type(self).__name__
        sums = second = shift = counts = None
        with eval_mode(self.model):
            batches = self.batch_reader.labeled(loader, f"{who}.fit's loader (labeled ID training data)")
            for images, labels in tqdm(batches, desc=f"{who} fit", disable=not progress, leave=False):
                x = self._prepare(images)
                y = labels.to(x.device).long().reshape(-1)
                if y.numel() != x.shape[0]:
                    raise ValueError(f"{who}.fit: {x.shape[0]} images but {y.numel()} labels in a batch")
                if y.numel() == 0:
                    continue
                if y.min() < 0:
                    raise ValueError(f"{who}.fit: labels must be >= 0, got {int(y.min())}")
                feats, _ = self._features(x)
                if sums is None:
                    # Accumulate around the first batch's mean: keeps the second moment free of cancellation.
                    shift = [f.mean(0) for f in feats]
                    sums = [f.new_zeros(0, f.shape[1]) for f in feats]
                    second = [f.new_zeros(f.shape[1], f.shape[1]) for f in feats]
                    counts = torch.zeros(0, dtype=torch.float64, device=x.device)
                num_classes = max(counts.numel(), int(y.max()) + 1)
                if num_classes > counts.numel():  # labels seen so far define the classes; grow the tables
                    grow = num_classes - counts.numel()
                    counts = torch.cat([counts, counts.new_zeros(grow)])
                    sums = [torch.cat([s, s.new_zeros(grow, s.shape[1])]) for s in sums]
                counts += torch.bincount(y, minlength=num_classes).double()
                for i, f in enumerate(feats):
                    c = f - shift[i]
                    sums[i].index_add_(0, y, c)
                    second[i] += c.T @ c
        if sums is None:
            raise ValueError(f"{who}.fit: the loader yielded no samples")
        return counts, sums, second, shift

    def _fit_gaussians(self, counts, sums, second, shift):
        """Class means, tied covariance and its whitening per layer from :meth:`_stream_moments`' sums."""
        who = type(self).__name__
        present = counts > 0
        if not present.all():
            missing = torch.nonzero(~present).flatten().tolist()
            warnings.warn(f"{who}.fit: classes {missing} have no training samples and are left out")
        self.classes = torch.nonzero(present).flatten()
        n, n_c = counts.sum(), counts[present]
        self.means, self.precisions, self._whiten, self._white_means = [], [], [], []
        for name, s, m2, sh in zip(self.layers, sums, second, shift):
            centered_means = s[present] / n_c[:, None]
            # Within-class scatter = sum_i (z_i - mu_{y_i})(...)^T = sum_i z_i z_i^T - sum_c n_c mu_c mu_c^T.
            cov = (m2 - (centered_means * n_c[:, None]).T @ centered_means) / n
            whiten = whitening(cov, f"{who}.fit: the features of layer {name!r} do not vary within classes "
                                    "(zero covariance); use other layers or more data")
            means = centered_means + sh
            self.means.append(means)
            self.precisions.append(whiten @ whiten.T)
            self._whiten.append(whiten)
            self._white_means.append(means @ whiten)

    # ------------------------------------------------------------------ scoring
    def _min_distances(self, feats):
        """Per layer, the squared Mahalanobis distance [B] to the closest class mean."""
        out = []
        for f, whiten, white_means in zip(feats, self._whiten, self._white_means):
            z = f @ whiten                                                   # [B, R]
            d = (z * z).sum(1, keepdim=True) - 2.0 * z @ white_means.T + (white_means * white_means).sum(1)
            out.append(d.clamp_min(0.0).amin(dim=1))
        return out

    def _score_and_predict(self, x):
        if self.means is None:
            raise RuntimeError("Mahalanobis detector is not fitted: call fit(id_train_loader) first")
        if self.epsilon == 0:
            feats, output = self._features(x)
            total = torch.stack(self._min_distances(feats)).sum(0)
        else:
            x_grad = x.detach().requires_grad_(True)
            feats, output = self._features(x_grad)
            distances = self._min_distances(feats)
            total = 0
            for layer, d in enumerate(distances):  # Eq. 4 per layer, then that layer scored at its own x^
                (grad,) = torch.autograd.grad(d.sum(), x_grad, retain_graph=layer < len(distances) - 1)
                with torch.no_grad():
                    feats_hat, _ = self._features(x - self.epsilon * grad.sign())
                    total = total + self._min_distances(feats_hat)[layer]
        return total.detach().float(), output.detach().argmax(dim=1) if is_logits(output) else None
