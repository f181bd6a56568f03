"""What every objective shares: the call convention, the once-only data-range check, the outlier draw and the
joint ID + outlier forward."""
import math
import warnings

import torch
from torch import nn

from fastood._stack import user_stacklevel
from fastood.data_range import DataRangeWarning, range_problems
from fastood.outlier_sources import as_outlier_source


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_weight(name: str, value, positive: bool = False) -> float:
    """``value`` as a float: a finite number >= 0 (> 0 with ``positive``), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def check_id_batch(owner: str, x, y=None) -> None:
    """An ID batch must be a non-empty tensor [b, ...] with labels [b] (when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: x must be a tensor of ID images [b, ...], got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{owner} got an empty ID batch (x of shape {tuple(x.shape)})")
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]):
        got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{owner}: y must hold one class index per image, shape [{x.shape[0]}], got {got}")


class Objective:
    """One training step of a method as a function of a batch: ``loss, logs = objective(model, x, y)``.

    ``loss`` is a scalar tensor to minimize (call ``loss.backward()``), ``logs`` a dict of detached scalars (tensors
    or floats) describing the step, ``logs["loss"]`` included, e.g. for ``LightningModule.log_dict``. An objective
    never steps an optimizer and never switches the model's train/eval mode (except inside a sampler, which
    restores it): the loop around it does. Samplers are given the model without its DDP wrapper.

    BatchNorm: the fine-tuning methods want it frozen while outliers pass through the model (FIG's trainer does it
    by default); in your loop wrap the call in :func:`fastood.frozen_batchnorm`.

    ``check_range`` (default True): on its first call an objective that generates images in a box (FIG, GS,
    manifold) checks the ID batch against that box (:func:`fastood.check_data_range`) and warns once when they
    disagree. The trainers check in ``fit`` instead and build their objective with ``check_range=False``.
    """

    #: the name messages start with (the trainers set their own class name)
    owner = None

    def __init__(self, check_range: bool = True):
        self.check_range = bool(check_range)
        self._range_checked = False
        if self.owner is None:
            self.owner = type(self).__name__

    def __call__(self, model, x, y, *args, **kwargs):
        raise NotImplementedError

    def data_box(self):
        """``(lower, upper)`` where this objective generates images, or None. Default: the bounds of its
        ``sampler`` attribute, when it has them."""
        sampler = getattr(self, "sampler", None)
        lower, upper = getattr(sampler, "lower", None), getattr(sampler, "upper", None)
        return None if lower is None or upper is None else (tuple(lower), tuple(upper))

    def _check_range_once(self, x) -> None:
        if not self.check_range or self._range_checked:
            return
        self._range_checked = True
        box = self.data_box()
        if box is None or not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            return
        problems = range_problems(x, box, strict=False)
        if problems:
            warnings.warn(f"{self.owner}: " + "; and ".join(problems), DataRangeWarning,
                          stacklevel=user_stacklevel())

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("check_range", "owner")
                  and isinstance(v, (int, float, str, bool, tuple, type(None)))}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class OutlierObjective(Objective):
    """An objective whose step also needs a batch of outliers (or unlabeled images).

    Give them to each call (``objective(model, x, y, x_out)``) or once, as ``outliers=``: a DataLoader of images
    (or of ``(images, ...)`` tuples), a sampler of :mod:`fastood.samplers`, or an
    :class:`~fastood.outlier_sources.OutlierSource` (:func:`~fastood.outlier_sources.as_outlier_source`); the
    objective then draws ``ceil(outlier_ratio * b)`` of them per ID batch of b (a plain loader gives its own batch
    size) from the model being trained.

    ``joint_forward`` (default True): ID images and outliers go through the model in ONE forward of their
    concatenation (BatchNorm in train mode then normalizes with the mixed batch, as the OE / Energy-OE reference
    code does); False: two forwards.
    """

    def __init__(self, outliers=None, outlier_ratio: float = 1.0, joint_forward: bool = True, seed: int = 0,
                 check_range: bool = True):
        super().__init__(check_range=check_range)
        if isinstance(outlier_ratio, bool) or not isinstance(outlier_ratio, (int, float)) \
                or not math.isfinite(outlier_ratio) or outlier_ratio <= 0:
            raise ValueError(f"outlier_ratio must be a finite number > 0, got {outlier_ratio!r}")
        self.outliers = None if outliers is None else as_outlier_source(outliers, seed=seed)
        self.outlier_ratio = float(outlier_ratio)
        self.joint_forward = bool(joint_forward)

    def draw_outliers(self, model, x: torch.Tensor, y=None) -> torch.Tensor:
        """Outlier images for the ID batch ``x`` [b, *shape] from ``outliers=``, on ``x``'s device and dtype."""
        if self.outliers is None:
            raise TypeError(f"{self.owner} has no outlier source: pass the outlier batch to the call "
                            "(objective(model, x, y, x_out)) or outliers= (a DataLoader or a sampler) to the "
                            "constructor")
        n = math.ceil(self.outlier_ratio * x.shape[0])
        context = None if y is None else (x, y)
        x_out = self.outliers.draw(n, unwrap(model), tuple(x.shape[1:]), context=context)
        return self._match(x_out, x)

    @staticmethod
    def _match(x_out, x):
        if not isinstance(x_out, torch.Tensor):
            raise TypeError(f"x_out must be a tensor of outlier images [m, ...], got {type(x_out).__name__}")
        if x_out.dim() == 0 or (x_out.shape[0] and tuple(x_out.shape[1:]) != tuple(x.shape[1:])):
            raise ValueError(f"outlier images have shape {tuple(x_out.shape[1:])} but the ID images have "
                             f"{tuple(x.shape[1:])}")
        return x_out.to(device=x.device, dtype=x.dtype, non_blocking=True)

    def outliers_for(self, model, x, y=None, x_out=None) -> torch.Tensor:
        """``x_out`` checked and moved to ``x``'s device and dtype, or (None) drawn from the source."""
        return self.draw_outliers(model, x, y) if x_out is None else self._match(x_out.detach(), x)

    def forward_in_out(self, model, x_in: torch.Tensor, x_out: torch.Tensor):
        """``(model(x_in), model(x_out))`` from one concatenated forward (``joint_forward``) or two.

        Tensor outputs are split along the batch; a tuple/list output (e.g. :class:`~fastood.models.TwoHead`'s
        ``(logits1, logits2)``) is split item by item.
        """
        if not self.joint_forward:
            return model(x_in), model(x_out)
        b = x_in.shape[0]
        out = model(torch.cat([x_in, x_out]))
        if isinstance(out, torch.Tensor):
            return out[:b], out[b:]
        if isinstance(out, (tuple, list)):
            return type(out)(o[:b] for o in out), type(out)(o[b:] for o in out)
        raise TypeError(f"the model returned {type(out).__name__}; expected a tensor or a tuple of tensors")


def detached(logs: dict) -> dict:
    """``logs`` with every tensor detached."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}
