"""ODIN (Liang, Li, Srikant, ICLR 2018): temperature scaling plus input perturbation."""
import torch

from .base import Detector, eval_mode, logits_of


class ODIN(Detector):
    """score = ``-max_k softmax(f(x~) / T)_k`` (higher = more OOD), with the perturbed input (paper Eq. 2)

        ``x~ = x - epsilon * sign(-grad_x log max_k softmax(f(x) / T)_k)``,

    i.e. a step that raises the temperature-scaled confidence; ID inputs gain more than OOD ones.

    The step is taken in the model's input space (fastood images lie in [-1, 1], so a pixel-space step ``e``
    of the paper, whose code divided by the normalization std, corresponds to ``2 e`` here). Defaults:
    ``T = 1000``, ``epsilon = 0.0014`` (the paper's CIFAR-10 / DenseNet setting); pick both on validation data
    with :func:`fastood.detectors.tune_detector`. ``epsilon = 0`` is temperature scaling alone (no gradient).
    ``predict`` classifies the clean input x.
    """

    hyperparameters = ("T", "epsilon")

    def __init__(self, model, T: float = 1000.0, epsilon: float = 0.0014):
        super().__init__(model)
        self.T, self.epsilon = T, epsilon
        self._check_hyperparameters()

    def _check_hyperparameters(self):
        if not (isinstance(self.T, (int, float)) and self.T > 0):
            raise ValueError(f"T must be a number > 0, got {self.T!r}")
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        self.T, self.epsilon = float(self.T), float(self.epsilon)

    @property
    def needs_input_grad(self) -> bool:
        return self.epsilon > 0

    def _perturb(self, x):
        """``(x~, logits of the clean x)``; x~ is detached."""
        x = x.detach().requires_grad_(True)
        logits = logits_of(self.model(x), "ODIN")
        log_confidence = torch.log_softmax(logits.float() / self.T, dim=1).amax(dim=1)   # log S_yhat(x; T)
        (grad,) = torch.autograd.grad(log_confidence.sum(), x)
        return (x + self.epsilon * grad.sign()).detach(), logits.detach()   # = x - eps * sign(-grad)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbed input x~ [B, ...] (on the model's device; x itself when ``epsilon == 0``)."""
        x = self._prepare(x)
        if self.epsilon == 0:
            return x
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            return self._perturb(x.clone() if x.is_inference() else x)[0]

    def _score_and_predict(self, x):
        if self.epsilon > 0:
            x_tilde, clean_logits = self._perturb(x)
            with torch.no_grad():
                logits = logits_of(self.model(x_tilde), "ODIN")
        else:
            logits = clean_logits = logits_of(self.model(x), "ODIN")
        score = -torch.softmax(logits.float() / self.T, dim=1).amax(dim=1)
        return score, clean_logits.argmax(dim=1)
