"""ODIN (Liang et al., ICLR 2018): temperature scaling plus input perturbation."""
import torch

from .base import Detector


class ODIN(Detector):
    """score = ``-max_k softmax(f(x~) / T)_k`` with ``x~ = x - epsilon * sign(-grad_x log max_k softmax(f(x)/T)_k)``
    (higher = more OOD).

    The perturbation is applied in the model's input space (here images in [-1, 1]; the paper's code divided
    epsilon by the per-channel normalization std, which this space already absorbs). Defaults: T = 1000,
    epsilon = 0.0014 (the paper's CIFAR setting); pick both on validation data with ``tune_detector``.
    """

    needs_input_grad = True

    def __init__(self, model, T: float = 1000.0, epsilon: float = 0.0014):
        super().__init__(model)
        if not T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.T, self.epsilon = float(T), float(epsilon)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbed input x~ (detached)."""
        x = x.detach().requires_grad_(True)
        log_msp = torch.log_softmax(self.model(x).float() / self.T, dim=1).amax(dim=1)
        (grad,) = torch.autograd.grad(log_msp.sum(), x)
        return (x + self.epsilon * grad.sign()).detach()  # x - eps * sign(-grad)

    def _score_and_predict(self, x):
        x_tilde = self.perturb(x) if self.epsilon > 0 else x
        with torch.no_grad():
            logits = self.model(x_tilde).float()
        return -torch.softmax(logits / self.T, dim=1).amax(dim=1), logits.argmax(dim=1)
