"""Noise samplers: the GS baseline of FIG (Gaussian noise) and uniform noise, behind the sampler protocol."""
import torch

from fastood.trainers.base import model_device


class _NoiseSampler:
    def __init__(self, bounds=(-1.0, 1.0)):
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo < hi:
            raise ValueError(f"bounds must satisfy lower < upper, got {bounds}")
        self.bounds = (lo, hi)
        self.stats = {}

    def _draw(self, size, device):
        raise NotImplementedError

    def sample(self, model, n, shape, context=None):
        """``n`` noise images of ``shape`` [n, *shape] on the model's device (torch's default generator)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        device = model_device(model) if model is not None else torch.device("cpu")
        x = self._draw((int(n),) + tuple(shape), device)
        self.stats = {"n": int(n)}
        return x


class GaussianNoiseSampler(_NoiseSampler):
    """``clip(mean + std * N(0, I), bounds)`` (FIG's GS baseline)."""

    def __init__(self, std: float = 0.5, mean: float = 0.0, bounds=(-1.0, 1.0)):
        super().__init__(bounds)
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std, self.mean = float(std), float(mean)

    def _draw(self, size, device):
        return (self.mean + self.std * torch.randn(size, device=device)).clamp_(*self.bounds)


class UniformNoiseSampler(_NoiseSampler):
    """``U(bounds)`` per pixel."""

    def _draw(self, size, device):
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.rand(size, device=device)
