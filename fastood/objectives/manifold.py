"""The step of the (n+1)-class classifier of Vernekar et al. 2019 ("OOD detection in classifiers via generation")
as an objective: class n+1 is trained on the CVAE's manifold outliers."""
import math

import torch
from torch import nn

from fastood.losses import extra_class_loss

from .base import Objective, check_id_batch, unwrap


def check_ratio(ratio, name="ratio"):
    """``(id, type1, type2)`` weights: finite, >= 0, id > 0 and type1 + type2 > 0. Returns floats."""
    if isinstance(ratio, (str, bytes)) or not hasattr(ratio, "__len__") or len(ratio) != 3:
        raise ValueError(f"{name} must be three numbers (ID, type I, type II), got {ratio!r}")
    r = tuple(float(v) for v in ratio)
    if not all(math.isfinite(v) and v >= 0 for v in r) or r[0] <= 0 or r[1] + r[2] <= 0:
        raise ValueError(f"{name} must be finite and >= 0 with ID > 0 and type I + type II > 0, got {ratio!r}")
    return r


def manifold_sampler(cvae, bounds=None, beta_range=None, shell=None, ellipsoid=None):
    """A :class:`~fastood.samplers.manifold.ManifoldSampler` around a ConditionalVAE (in ``bounds``, default
    (-1, 1); type-I step ``beta_range``, type-II ``shell`` and ``ellipsoid``, each None for the sampler's default), or
    ``cvae`` itself when it already is a sampler ``sample(model, n, shape, context)``."""
    from fastood.samplers.manifold import ManifoldSampler

    given = {"beta_range": beta_range, "shell": shell, "ellipsoid": ellipsoid}
    if isinstance(cvae, nn.Module):
        options = {k: v for k, v in given.items() if v is not None}
        return ManifoldSampler(cvae, bounds=(-1.0, 1.0) if bounds is None else bounds, **options)
    for name, value in (("bounds", bounds),) + tuple(given.items()):
        if value is not None:
            raise ValueError(f"{name} is for the default sampler built around a CVAE; pass it to your sampler "
                             "instead")
    if not callable(getattr(cvae, "sample", None)):
        raise TypeError(f"cvae must be a ConditionalVAE or a sampler with sample(model, n, shape, context), got "
                        f"{type(cvae).__name__}")
    return cvae


class ManifoldObjective(Objective):
    """The n+1 classifier's loss of one ID batch: ``loss, logs = ManifoldObjective(sampler)(model, x, y)``.

    Adds ``round(b * ratio[1] / ratio[0])`` type-I and ``round(b * ratio[2] / ratio[0])`` type-II outliers (default
    2:1:1, i.e. b/2 + b/2) from ``sampler`` (a fitted :class:`~fastood.samplers.manifold.ManifoldSampler`: type I
    perturbs images of this batch off the manifold, type II decodes class-boundary latents), all labeled n, and
    returns the class-weighted cross-entropy over the joint batch, weight 1 for the n ID classes and ``ood_weight``
    (0.1) for the outlier class (:func:`fastood.losses.extra_class_loss`). One forward over the joint batch.
    :class:`~fastood.trainers.ManifoldTrainer` is a loop over this objective.

    Args:
        sampler: a fitted ManifoldSampler (``ManifoldSampler(cvae).fit(loader)``), a trained
            :class:`~fastood.models.ConditionalVAE` (wrapped in a ManifoldSampler in ``bounds``; fit it before the
            first call: ``objective.sampler.fit(loader)``), or any sampler ``sample(model, n, shape, context=(x,
            y))`` (it then draws the type-I + type-II total).
        ood_weight: CE weight of the outlier class (paper 0.1), > 0.
        ratio: ID : type I : type II per batch (default (2, 1, 1)).
        bounds: data range of the default sampler (only with a CVAE).
        check_range: check the first ID batch against the sampler's box (:func:`fastood.check_data_range`).
        beta_range: type-I step of the default sampler (only with a CVAE): ``"authors"`` (its default), ``"paper"``
            or ``(low, high)``; see :class:`~fastood.samplers.manifold.ManifoldSampler`.
        shell, ellipsoid: the default sampler's type-II options (only with a CVAE; None: the sampler's defaults);
            see :class:`~fastood.samplers.manifold.ManifoldSampler`.

    Call: ``model`` a classifier with n + 1 outputs (the last one "outlier"; grow a trained head with
    :func:`fastood.trainers.manifold.grow_head`), ``x`` [b, ...], ``y`` [b] in [0, n-1]. Returns ``(loss, logs)``,
    logs ``loss``, ``ce_id`` (CE of the ID part), ``acc`` (ID accuracy over the n classes), ``type1_rejected`` /
    ``type2_rejected`` (fraction of each outlier type classified as class n+1; NaN when none were drawn; a sampler
    without types: ``rejected``), ``type1_step`` (mean ``|x~ - x|_2`` of the type-I outliers), ``type1_step_rel``
    (that over :attr:`id_nn_distance`, when set: see :func:`fastood.trainers.manifold.median_nn_distance`) and
    ``type2_radius`` (mean Mahalanobis radius of the type-II latents).
    """

    def __init__(self, sampler, ood_weight: float = 0.1, ratio=(2, 1, 1), bounds=None, check_range: bool = True,
                 beta_range=None, shell=None, ellipsoid=None):
        super().__init__(check_range=check_range)
        if not (isinstance(ood_weight, (int, float)) and math.isfinite(ood_weight) and ood_weight > 0):
            raise ValueError(f"ood_weight must be a finite number > 0, got {ood_weight!r}")
        self.ratio = check_ratio(ratio)
        self.sampler = manifold_sampler(sampler, bounds, beta_range, shell, ellipsoid)
        self.ood_weight = float(ood_weight)
        #: median distance from an ID image to its nearest neighbour in a batch (the type-I step's scale), or None
        self.id_nn_distance = None
        self._type1_step = None

    @property
    def _typed(self) -> bool:
        return all(callable(getattr(self.sampler, a, None)) for a in ("type1", "type2"))

    def counts(self, batch_size: int):
        """``(type I, type II)`` outliers drawn for an ID batch of ``batch_size``."""
        return (int(round(batch_size * self.ratio[1] / self.ratio[0])),
                int(round(batch_size * self.ratio[2] / self.ratio[0])))

    def outliers(self, model, x, y):
        """``(outliers, n1)``: the type-I then type-II outliers for the batch (n1 of type I), or ``(outliers,
        None)`` from a sampler without types."""
        b = x.shape[0]
        n1, n2 = self.counts(b)
        if not self._typed:
            gen = self.sampler.sample(unwrap(model), n1 + n2, tuple(x.shape[1:]), context=(x, y))
            return gen.to(device=x.device, dtype=x.dtype), None
        parts = []
        self._type1_step = None
        if n1:
            idx = torch.randperm(b, device=x.device)[:n1] if n1 <= b else torch.randint(b, (n1,), device=x.device)
            parts.append(self.sampler.type1(x[idx], y[idx]).to(device=x.device, dtype=x.dtype))
            step = getattr(self.sampler, "stats", {}).get("step")
            self._type1_step = step.float() if isinstance(step, torch.Tensor) and step.numel() else \
                (parts[-1] - x[idx]).flatten(1).norm(dim=1).float()
        if n2:
            parts.append(self.sampler.type2(n2).to(device=x.device, dtype=x.dtype))
        return torch.cat(parts), n1

    def __call__(self, model, x, y):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError(f"{self.owner} needs labeled ID batches (x, y)")
        check_id_batch(self.owner, x, y)
        self._check_range_once(x)
        generated, n1 = self.outliers(model, x, y)
        logits = model(torch.cat([x, generated])).float()
        n_out = logits.shape[1]
        if n_out < 2:
            raise ValueError(f"the model must have n + 1 >= 2 outputs (the last is the outlier class), got {n_out}")
        if int(y.max()) >= n_out - 1 or int(y.min()) < 0:
            raise ValueError(f"labels must lie in [0, {n_out - 2}]: the model has {n_out} outputs = n ID classes + "
                             f"the outlier class; got labels up to {int(y.max())} (train from scratch with n + 1 "
                             "outputs, or grow a trained head: extend_head=True / fastood.trainers.manifold."
                             "grow_head(model))")
        b = x.shape[0]
        loss = extra_class_loss(logits[:b], y, logits[b:], self.ood_weight)
        with torch.no_grad():
            pred = logits.detach().argmax(1)
            rejected = (pred[b:] == n_out - 1).float()
            nan = torch.tensor(float("nan"))
            logs = {"loss": loss.detach(), "ce_id": torch.nn.functional.cross_entropy(logits[:b].detach(), y),
                    "acc": (logits[:b, :-1].argmax(1) == y).float().mean()}
            if n1 is None:
                logs["rejected"] = rejected.mean() if rejected.numel() else nan
            else:
                logs["type1_rejected"] = rejected[:n1].mean() if n1 else nan
                logs["type2_rejected"] = rejected[n1:].mean() if rejected.numel() > n1 else nan
            logs.update(self.mechanism_logs(n1))
        return loss, logs

    def mechanism_logs(self, n1):
        """Mean type-I step (absolute and relative to :attr:`id_nn_distance`) and type-II radius of the last draw."""
        nan = float("nan")
        stats = getattr(self.sampler, "stats", {}) or {}
        step = stats.get("step")
        if n1 is None:  # a custom sampler: measure nothing it does not report
            step_mean = float(step.float().mean()) if isinstance(step, torch.Tensor) and step.numel() else nan
        elif n1:
            # the typed path draws type I and then type II, so stats describe type II: measure type I directly
            step_mean = float(self._type1_step.mean()) if self._type1_step is not None else nan
        else:
            step_mean = nan
        radius = stats.get("radius")
        radius_mean = float(radius.float().mean()) if isinstance(radius, torch.Tensor) and radius.numel() else nan
        rel = step_mean / self.id_nn_distance if self.id_nn_distance and math.isfinite(step_mean) else nan
        return {"type1_step": step_mean, "type1_step_rel": rel, "type2_radius": radius_mean}


__all__ = ["ManifoldObjective", "check_ratio", "manifold_sampler"]
