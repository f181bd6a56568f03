"""ODIN (Liang, Li, Srikant, ICLR 2018): temperature scaling plus input perturbation."""
import torch

from ._perturbation import InputPerturbation
from .base import Detector, eval_mode, logits_of


class ODIN(InputPerturbation, Detector):
    """score = ``-max_k softmax(f(x~) / T)_k`` (higher = more OOD), with the perturbed input (paper Eq. 2)

        ``x~ = x - epsilon * sign(-grad_x log max_k softmax(f(x) / T)_k)``,

    i.e. a step that raises the temperature-scaled confidence; ID inputs gain more than OOD ones.

    Units of ``epsilon``: with ``std=None`` the step is taken in the model's input space (fastood's built-in images
    lie in [-1, 1], so a pixel-space step ``e`` of the paper corresponds to ``2 e`` there). For data normalized
    with ``(x - mean) / std``, give ``std`` (a number or one per channel, as given to the normalization): epsilon
    is then in pixel units ([0, 1] images) and channel c moves by ``epsilon / std[c]``, as the paper's code does
    (its gradient divided by the normalization std). Defaults:
    ``T = 1000``, ``epsilon = 0.0014`` (the paper's CIFAR-10 / DenseNet setting); pick both on validation data
    with :func:`fastood.detectors.tune_detector`. ``epsilon = 0`` is temperature scaling alone (no gradient).
    ``predict_class`` classifies the clean input x.
    """

    hyperparameters = ("T", "epsilon")

    def __init__(self, model, T: float = 1000.0, epsilon: float = 0.0014, std=None, **batch_options):
        super().__init__(model, **batch_options)
        self.T, self.epsilon = T, epsilon
        self._check_hyperparameters()
        self.std = None
        if std is not None:
            values = [float(v) for v in (std.reshape(-1).tolist() if isinstance(std, torch.Tensor) else
                                         (std if hasattr(std, "__len__") else [std]))]
            if not values or not all(v > 0 and v < float("inf") for v in values):
                raise ValueError(f"std must be a positive number or one positive number per channel, got {std!r}")
            self.std = tuple(values)

    def _step(self, x):
        """``epsilon`` in x's units: a scalar, or [1, C, 1, ...] when ``std`` is per channel."""
        if self.std is None:
            return self.epsilon
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        if std.numel() > 1:
            if x.dim() < 2 or x.shape[1] != std.numel():
                raise ValueError(f"ODIN: std has {std.numel()} values but the images have shape {tuple(x.shape[1:])} "
                                 f"({x.shape[1] if x.dim() > 1 else 0} channels)")
            std = std.reshape((1, -1) + (1,) * (x.dim() - 2))
        return self.epsilon / std

    def _check_hyperparameters(self):
        if not (isinstance(self.T, (int, float)) and self.T > 0):
            raise ValueError(f"T must be a number > 0, got {self.T!r}")
        self.T = float(self.T)
        super()._check_hyperparameters()   # epsilon (InputPerturbation)

    def _perturb(self, x):
        """``(x~, logits of the clean x)``; x~ is detached."""
        x = x.detach().requires_grad_(True)
        logits = logits_of(self.model(x), "ODIN")
        log_confidence = torch.log_softmax(logits.float() / self.T, dim=1).amax(dim=1)   # log S_yhat(x; T)
        (grad,) = torch.autograd.grad(log_confidence.sum(), x)
        return (x + self._step(x) * grad.sign()).detach(), logits.detach()   # = x - eps * sign(-grad)

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
