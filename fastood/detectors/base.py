"""Detector base class: scores where higher = more OOD, computed batch by batch on the model's device."""
import contextlib

import torch
from torch import nn

from fastood.trainers.base import first_item, model_device


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode, restoring its previous train/eval flags (every submodule) afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class Detector:
    """Base class. Subclasses implement :meth:`_score_and_predict`.

    Every detector: ``fit(loader)`` where it needs ID training data (returns self), ``score(x) -> [B]`` (higher =
    more OOD, float32 on the model's device), ``score_loader(loader) -> [N]`` (CPU), ``predict(x) -> [B]`` class
    indices. Scoring runs the model in eval mode (restored afterwards) and without autograd unless the method
    needs input gradients (``needs_input_grad``).
    """

    needs_input_grad = False

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def fit(self, loader):
        return self

    def _score_and_predict(self, x: torch.Tensor):
        """(scores [B], predicted classes [B] or None) for a batch already on the device."""
        raise NotImplementedError

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got dtype {x.dtype}")
        return x.to(self.device)

    def score_and_predict(self, x: torch.Tensor):
        x = self._check_input(x)
        if x.shape[0] == 0:
            return x.new_zeros(0), torch.zeros(0, dtype=torch.long, device=x.device)
        with eval_mode(self.model), torch.set_grad_enabled(self.needs_input_grad):
            scores, predictions = self._score_and_predict(x)
        return scores.detach().float(), None if predictions is None else predictions.detach()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores [B] of an image batch (higher = more OOD)."""
        return self.score_and_predict(x)[0]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ID classes [B]."""
        return self.score_and_predict(x)[1]

    def score_loader(self, loader, progress: bool = False) -> torch.Tensor:
        """Scores of every batch of ``loader`` (tensors or tuples whose first item is the images) -> CPU [N]."""
        return self.score_loader_with_predictions(loader, progress)[0]

    def score_loader_with_predictions(self, loader, progress: bool = False):
        from tqdm.auto import tqdm

        scores, predictions = [], []
        for batch in tqdm(loader, desc=self.name, disable=not progress, leave=False):
            s, p = self.score_and_predict(first_item(batch))
            scores.append(s.cpu())
            if p is not None:
                predictions.append(p.cpu())
        scores = torch.cat(scores) if scores else torch.zeros(0)
        return scores, (torch.cat(predictions) if predictions else None)
