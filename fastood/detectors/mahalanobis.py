"""Mahalanobis detector (Lee et al., NeurIPS 2018): class-conditional Gaussians with a tied covariance on
pooled features of chosen layers."""
import torch
from torch import nn

from fastood.trainers.base import first_item

from .base import Detector, eval_mode


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pool of [B, C, H, W] (or flatten of [B, ...]) to [B, F]."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t.flatten(1)


class Mahalanobis(Detector):
    """score = ``sum_layers min_c (z - mu_c)^T Sigma^-1 (z - mu_c)`` (higher = more OOD).

    Args:
        model: the classifier.
        layers: names of submodules (``dict(model.named_modules())``) whose outputs are pooled into features;
            default: the input of the final linear layer (penultimate features).
        epsilon: input perturbation that decreases the distance to the closest class (0 = off).
    ``fit(loader)`` streams the ID training data once, accumulating per-class sums and the total second moment
    in float64 (memory O(classes x F + F^2), independent of the data size).
    """

    needs_input_grad = True

    def __init__(self, model, layers=None, epsilon: float = 0.0):
        super().__init__(model)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        modules = dict(model.named_modules())
        if layers is None:
            from fastood.models import split_head

            self._targets = [("penultimate", split_head(model)[1], True)]
        else:
            missing = [n for n in layers if n not in modules]
            if missing:
                raise ValueError(f"layers {missing} not found in the model; some valid names: {list(modules)[1:12]}")
            self._targets = [(n, modules[n], False) for n in layers]
        self.means = None       # per layer [C, F]
        self.precisions = None  # per layer [F, F]

    def _features(self, x):
        feats, handles = {}, []
        for name, module, use_input in self._targets:
            if use_input:
                hook = (lambda n: lambda m, inp: feats.__setitem__(n, _pool(inp[0])))(name)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = (lambda n: lambda m, inp, out: feats.__setitem__(n, _pool(out)))(name)
                handles.append(module.register_forward_hook(hook))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return [feats[name].double() for name, _, _ in self._targets], logits

    @torch.no_grad()
    def fit(self, loader):
        sums, counts, second = None, None, None
        with eval_mode(self.model):
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("Mahalanobis.fit needs a labeled loader yielding (images, labels)")
                x, y = batch[0].to(self.device), batch[1].to(self.device).long()
                feats, logits = self._features(x)
                if sums is None:
                    c = logits.shape[1]
                    sums = [torch.zeros(c, f.shape[1], dtype=torch.float64, device=f.device) for f in feats]
                    second = [torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device) for f in feats]
                    counts = torch.zeros(c, dtype=torch.float64, device=x.device)
                counts += torch.bincount(y, minlength=counts.numel()).double()
                for i, f in enumerate(feats):
                    sums[i].index_add_(0, y, f)
                    second[i] += f.T @ f
        if sums is None:
            raise ValueError("Mahalanobis.fit: the loader yielded no batches")
        if (counts == 0).any():
            raise ValueError(f"Mahalanobis.fit: classes {torch.nonzero(counts == 0).flatten().tolist()} have no samples")
        n = counts.sum()
        self.means, self.precisions = [], []
        for s, m2 in zip(sums, second):
            means = s / counts[:, None]
            cov = (m2 - (means * counts[:, None]).T @ means) / n  # tied within-class covariance
            self.means.append(means)
            self.precisions.append(torch.linalg.pinv(cov, hermitian=True))
        return self

    def _distances(self, x):
        feats, logits = self._features(x)
        total = 0
        for f, means, prec in zip(feats, self.means, self.precisions):
            diff = f[:, None, :] - means[None]                           # [B, C, F]
            d = torch.einsum("bcf,fg,bcg->bc", diff, prec, diff).amin(dim=1)
            total = total + d
        return total, logits

    def _score_and_predict(self, x):
        if self.means is None:
            raise RuntimeError("Mahalanobis detector is not fitted: call fit(id_train_loader) first")
        if self.epsilon > 0:
            x = x.detach().requires_grad_(True)
            dist, _ = self._distances(x)
            (grad,) = torch.autograd.grad(dist.sum(), x)
            x = (x - self.epsilon * grad.sign()).detach()
        with torch.no_grad():
            dist, logits = self._distances(x)
        return dist.float(), logits.argmax(dim=1)
