"""CMG's class-mixed pseudo-OOD images (Wang et al., ECML 2022): a conditional VAE decodes a condition that mixes
two different classes' conditioning vectors element by element, with a latent far from the prior's bulk."""
import math

import torch
from torch import nn

from fastood._hyperparameters import RecordsHyperparameters
from fastood.batches import model_device

from ._model_state import frozen
from .manifold import check_cvae, model_dtype
from .noise import check_count, check_shape


class ClassMixSampler(metaclass=RecordsHyperparameters):
    """Pseudo-OOD images ``g(z, k * e_i + (1 - k) * e_j)`` of a trained conditional VAE (CMG, stage 1).

    For each sample: two different classes ``i != j`` (i uniform over the classes, j uniform over the others),
    their conditioning vectors ``e_i, e_j`` (learned embeddings for CMG, or one-hot rows), a mask
    ``k ~ Bernoulli(0.5)`` drawn independently for every element of the vector, and ``z ~ N(0, sigma^2 I)``
    (sigma = 5, far outside the N(0, I) prior the decoder was trained on). The decoded images look like neither
    class: CMG trains the classifier to reject them.

    Args:
        cvae: a trained :class:`fastood.models.ConditionalVAE` (needs ``class_vectors``, ``decode``,
            ``latent_dim``, ``num_classes`` >= 2, ``image_shape``).
        sigma: standard deviation of the latent (> 0; paper 5).
        p: probability that an element is taken from ``e_i`` (paper 0.5), in [0, 1].
        batch_size: the most images decoded at once.

    ``sample(model, n, shape=None, context=None)`` -> [n, C, H, W] (detached, on the CVAE's device); ``model`` and
    ``context`` are ignored. ``stats``: ``pairs`` [n, 2] (i, j), ``mask_fraction`` (mean of k), ``latent_norm`` [n].
    Random numbers come from torch's default generator of the CVAE's device.
    """

    def __init__(self, cvae: nn.Module, sigma: float = 5.0, p: float = 0.5, batch_size: int = 256):
        check_cvae(cvae, ("class_vectors", "decode", "latent_dim", "num_classes", "image_shape"))
        if cvae.num_classes < 2:
            raise ValueError(f"class mixing needs a CVAE with at least 2 classes, got num_classes={cvae.num_classes}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"p must be a number in [0, 1], got {p!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.cvae, self.sigma, self.p, self.batch_size = cvae, float(sigma), float(p), batch_size
        self.stats = {}

    def pairs(self, n: int, device=None) -> torch.Tensor:
        """``n`` class pairs [n, 2] (long) with ``i != j``: i uniform, j uniform over the other classes."""
        n = check_count(n)
        c = self.cvae.num_classes
        i = torch.randint(c, (n,), device=device)
        j = torch.randint(c - 1, (n,), device=device)
        j = j + (j >= i).long()  # skip i: j is uniform over the c - 1 other classes
        return torch.stack([i, j], 1)

    @torch.no_grad()
    def mixed_conditions(self, pairs: torch.Tensor):
        """``(k * e_i + (1 - k) * e_j [n, cond_dim], k [n, cond_dim])`` for class pairs [n, 2]."""
        e_i, e_j = self.cvae.class_vectors(pairs[:, 0]), self.cvae.class_vectors(pairs[:, 1])
        k = torch.bernoulli(torch.full_like(e_i, self.p))
        return k * e_i + (1 - k) * e_j, k

    def sample(self, model=None, n=0, shape=None, context=None) -> torch.Tensor:
        """``n`` class-mixed images [n, C, H, W] (see the class docstring). ``shape``: None or the CVAE's shape."""
        n = check_count(n)
        image_shape = tuple(self.cvae.image_shape)
        if shape is not None and tuple(check_shape(shape)) != image_shape:
            raise ValueError(f"shape {tuple(shape)} does not match the CVAE's image shape {image_shape}")
        device, dtype = model_device(self.cvae), model_dtype(self.cvae)
        out = torch.empty((n,) + image_shape, device=device, dtype=dtype)
        pairs = self.pairs(n, device)
        z = self.sigma * torch.randn(n, self.cvae.latent_dim, device=device, dtype=dtype)
        kept = []
        with frozen(self.cvae), torch.no_grad():
            for start in range(0, n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                cond, k = self.mixed_conditions(pairs[sl])
                out[sl] = self.cvae.decode(z[sl], cond)
                kept.append(k.mean(1))
        self.stats = {"pairs": pairs, "latent_norm": z.norm(dim=1),
                      "mask_fraction": float(torch.cat(kept).mean()) if kept else float("nan")}
        return out
