"""Detector base class: OOD scores (higher = more OOD) computed batch by batch on the model's device."""
import copy

import torch
from torch import nn

from fastood._modes import eval_mode  # noqa: F401  (re-exported: fastood.detectors.eval_mode)
from fastood.batches import BatchReader, model_device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 for a parameter-free model)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def logits_of(output, detector_name: str) -> torch.Tensor:
    """Check that a model output is one logits tensor [B, C]; the error says which detector needs what."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        got = type(output).__name__ if not isinstance(output, torch.Tensor) else f"a tensor of shape {tuple(output.shape)}"
        raise TypeError(f"{detector_name} needs a model returning logits [B, C], got {got} "
                        "(two-head models: use Discrepancy)")
    return output


class Detector:
    """Base class of every detector. Higher score = more OOD.

    - ``fit(loader)``: learns from ID training data where the method needs it (returns ``self``; a no-op here).
    - ``score(x)``, or ``det(x)``: x [B, ...] (moved to the model's device and floating dtype) -> scores [B] on the
      model's device, float32 (float64 for MSP and Entropy, whose float32 values tie for confident inputs).
      This is what pytorch-ood's ``Detector.predict(x)`` returns.
    - ``predict_class(x)``: [B] class indices, the classifier's own decision (e.g. ``ExtraClass`` ignores the
      outlier class), or ``None`` when the model gives no class decision. (``predict`` raises: in pytorch-ood it
      means OOD scores, in scikit-learn a class, so fastood does not guess.)
    - ``score_loader(loader)``: a loader of image tensors, ``(images, labels)`` tuples or dicts -> CPU [N].

    Batches that are neither: ``batch_fn=`` or ``batch_keys=`` (:class:`fastood.batches.BatchReader`), given to the
    constructor or set later with :meth:`read_batches`.

    Scoring puts the model in eval mode (each submodule's mode is restored afterwards) and runs without autograd,
    except for methods whose ``needs_input_grad`` is true (input perturbation: ODIN, Mahalanobis with
    ``epsilon > 0``); those take gradients with respect to the input only, never accumulating parameter ``.grad``.

    Subclasses implement ``_score_and_predict(x) -> (scores [B], predictions [B] or None)``, list their
    hyperparameters in ``hyperparameters`` and validate them in ``_check_hyperparameters``.
    """

    hyperparameters: tuple = ()

    def __init__(self, model: nn.Module, *, batch_fn=None, batch_keys=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.batch_reader = BatchReader(batch_fn=batch_fn, batch_keys=batch_keys)

    def read_batches(self, batch_fn=None, batch_keys=None) -> "Detector":
        """Read loaders' batches with ``batch_fn`` / ``batch_keys`` (:class:`fastood.batches.BatchReader`). Returns
        ``self``."""
        self.batch_reader = BatchReader(batch_fn=batch_fn, batch_keys=batch_keys)
        return self

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        """Class name with hyperparameters, e.g. ``ODIN(T=1000, epsilon=0.0014)``."""
        params = ", ".join(f"{k}={getattr(self, k):g}" if isinstance(getattr(self, k), float)
                           else f"{k}={getattr(self, k)!r}" for k in self.hyperparameters)
        return f"{type(self).__name__}({params})" if params else type(self).__name__

    def __repr__(self):
        return self.name

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def needs_input_grad(self) -> bool:
        return False

    def _check_hyperparameters(self) -> None:
        """Raise ValueError for invalid hyperparameter values (subclasses)."""

    def replace(self, **params) -> "Detector":
        """A shallow copy with some hyperparameters changed, sharing the model and any fitted statistics.

        E.g. ``Mahalanobis(model).fit(train).replace(epsilon=0.002)`` tries a perturbation size without refitting.
        """
        unknown = sorted(set(params) - set(self.hyperparameters))
        if unknown:
            raise ValueError(f"{type(self).__name__}.replace: unknown hyperparameter(s) {unknown}; "
                             f"known: {list(self.hyperparameters)}")
        new = copy.copy(self)
        for k, v in params.items():
            setattr(new, k, v)
        new._check_hyperparameters()
        return new

    # ------------------------------------------------------------------ fitting / scoring
    def fit(self, loader, progress: bool = False) -> "Detector":
        """Learn from ID training data (no-op for detectors that need none). Returns ``self``."""
        return self

    def _score_and_predict(self, x: torch.Tensor):
        """(scores [B], predicted classes [B] or None) for a batch already on the model's device and dtype."""
        raise NotImplementedError

    def _prepare(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor image batch, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got dtype {x.dtype}")
        if x.dim() == 0:
            raise ValueError("x must be a batch [B, ...], got a 0-d tensor")
        return x.to(device=self.device, dtype=model_dtype(self.model))

    def score_and_predict(self, x: torch.Tensor):
        """``(scores [B] float32 or float64, predictions [B] long or None)``, both on the model's device."""
        x = self._prepare(x)
        if x.shape[0] == 0:
            return x.new_zeros(0, dtype=self.score_dtype), torch.zeros(0, dtype=torch.long, device=x.device)
        with eval_mode(self.model):
            if self.needs_input_grad:
                # Input gradients work even when called under torch.no_grad() or torch.inference_mode().
                with torch.inference_mode(False), torch.enable_grad():
                    scores, predictions = self._score_and_predict(x.clone() if x.is_inference() else x)
            else:
                with torch.no_grad():
                    scores, predictions = self._score_and_predict(x)
        return scores.detach().to(self.score_dtype), None if predictions is None else predictions.detach()

    #: dtype of the scores (float64 where float32 would round distinct scores to ties).
    score_dtype = torch.float32

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores [B] (:attr:`score_dtype`, on the model's device) of an image batch x [B, ...]; higher = more
        OOD. Same as calling the detector, ``det(x)``, and as pytorch-ood's ``Detector.predict(x)``."""
        return self.score_and_predict(x)[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``det(x) == det.score(x)``: OOD scores [B], higher = more OOD."""
        return self.score(x)

    def predict_class(self, x: torch.Tensor):
        """Predicted ID classes [B] (long, on the model's device), or None if the model gives none."""
        return self.score_and_predict(x)[1]

    @property
    def predict(self):
        """Refused (AttributeError, so ``hasattr(det, "predict")`` is False): ambiguous. pytorch-ood's
        ``predict(x)`` returns OOD scores, scikit-learn's a class; fastood has :meth:`score` and :meth:`predict_class`."""
        raise AttributeError(f"{type(self).__name__}.predict is ambiguous, so fastood has none: use det.score(x) or "
                             "det(x) for OOD scores (higher = more OOD; what pytorch-ood's Detector.predict returns), "
                             "or det.predict_class(x) for the classifier's class indices")

    def score_loader(self, loader, progress: bool = False, reader: BatchReader = None) -> torch.Tensor:
        """Scores [N] (:attr:`score_dtype`, CPU) of every batch of ``loader`` (image tensors, ``(images, ...)``
        tuples or dicts; see :class:`fastood.batches.BatchReader`)."""
        return self.score_loader_with_predictions(loader, progress, reader)[0]

    def score_loader_with_predictions(self, loader, progress: bool = False, reader: BatchReader = None):
        """``(scores [N], predictions [N] long or None)``, both on the CPU."""
        from tqdm.auto import tqdm

        reader = self.batch_reader if reader is None else reader
        scores, predictions = [], []
        for x, _ in tqdm(reader.unlabeled(loader, f"{self.name}'s loader"), desc=self.name, disable=not progress,
                         leave=False):
            s, p = self.score_and_predict(x)
            scores.append(s.cpu())
            if p is not None:
                predictions.append(p.cpu())
        complete = bool(predictions) and len(predictions) == len(scores)  # every batch had predictions
        scores = torch.cat(scores) if scores else torch.zeros(0, dtype=self.score_dtype)
        return scores, (torch.cat(predictions) if complete else None)
