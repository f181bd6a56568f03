"""CMG's stage 2 step (Wang et al., ECML 2022: class-mixed generation) as an objective: the head of a trained
classifier fine-tuned against class-mixed pseudo-OOD inputs."""
import torch
import torch.nn.functional as F

from fastood.losses import cmg_energy_loss, energy, extra_class_loss

from .base import Objective, check_id_batch

MODES = ("energy", "softmax")


class CMGObjective(Objective):
    """CMG stage 2's loss of one batch: ``loss, logs = CMGObjective("energy", m_in, m_out)(head, f_id, y, f_ood)``.

    Stage 2 freezes the feature extractor and fine-tunes only the head, so the call takes the module being trained
    and its inputs: the head with features ``f = backbone(x)`` (what :class:`~fastood.trainers.CMGTrainer` does,
    features cached), or a whole classifier with images (its frozen extractor in eval mode is then your loop's
    business). ``x_ood`` are the pseudo-OOD inputs of the batch: class-mixed CVAE images
    (:class:`~fastood.samplers.class_mix.ClassMixSampler`) or their features. One forward of the concatenation.

    - ``mode="energy"`` (CMG-energy): ``CE + lam * (mean relu(E_id - m_in)^2 + mean relu(m_out - E_ood)^2)``,
      ``E = -T logsumexp(f / T)`` (:func:`fastood.losses.cmg_energy_loss`); the paper's margins are the 20th / 80th
      percentiles of the ID / pseudo-OOD energies under the pretrained head, measured once before stage 2
      (:meth:`margins_from`). logs: ``loss``, ``ce``, ``reg``, ``energy_id``, ``energy_ood``, ``id_inside`` /
      ``ood_inside`` (fractions inside their margins: no regularizer gradient), ``acc``.
    - ``mode="softmax"`` (CMG-softmax): the head has an (n+1)-th "OOD" output; cross-entropy over the joint batch,
      pseudo-OOD labeled n (:func:`fastood.losses.extra_class_loss`, weight 1). logs: ``loss``, ``ce``,
      ``ood_rejected``, ``acc`` (over the n ID classes).

    Args:
        mode: ``"energy"`` or ``"softmax"``.
        m_in, m_out: the energy margins (energy mode; required before the first call, settable attributes).
        lam, T: energy-loss weight (0.1) and temperature (1).

    Call: ``(model, x, y, x_ood)``, ``x`` [b, ...] (b >= 1), ``y`` [b], ``x_ood`` [g, ...] (g may be 0).
    """

    def __init__(self, mode: str = "energy", m_in=None, m_out=None, lam: float = 0.1, T: float = 1.0):
        super().__init__(check_range=False)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("lam", lam), ("T", T)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if T <= 0:
            raise ValueError(f"T must be > 0, got T={T!r}")
        self.mode, self.lam, self.T = mode, float(lam), float(T)
        self.m_in = None if m_in is None else float(m_in)
        self.m_out = None if m_out is None else float(m_out)

    def margins_from(self, logits_id, logits_ood, quantiles=(0.2, 0.8)):
        """Set and return ``(m_in, m_out)``: the ``quantiles`` (CMG: 20th / 80th percentile, ``torch.quantile``)
        of the energies of ``logits_id`` [N, n] and ``logits_ood`` [P, n] (the pretrained head's outputs)."""
        e_id, e_ood = energy(logits_id.detach().float(), self.T), energy(logits_ood.detach().float(), self.T)
        self.m_in = float(torch.quantile(e_id.double(), quantiles[0]))
        self.m_out = float(torch.quantile(e_ood.double(), quantiles[1]))
        return self.m_in, self.m_out

    def __call__(self, model, x, y, x_ood):
        check_id_batch(self.owner, x, y)
        if not isinstance(x_ood, torch.Tensor) or tuple(x_ood.shape[1:]) != tuple(x.shape[1:]) \
                or x_ood.dim() != x.dim():
            got = f"shape {tuple(x_ood.shape)}" if isinstance(x_ood, torch.Tensor) else type(x_ood).__name__
            raise ValueError(f"{self.owner}: x_ood must be pseudo-OOD inputs [g, {', '.join(map(str, x.shape[1:]))}] "
                             f"like x, got {got}")
        logits = model(torch.cat([x, x_ood.to(device=x.device, dtype=x.dtype)])).float()
        b = x.shape[0]
        logits_id, logits_ood = logits[:b], logits[b:]
        if self.mode == "energy":
            if self.m_in is None or self.m_out is None:
                raise ValueError(f"{self.owner}: mode='energy' needs the margins m_in and m_out (give them, or measure "
                                 "them from the pretrained head with margins_from(logits_id, logits_ood))")
            loss, ce, reg = cmg_energy_loss(logits_id, y, logits_ood, self.m_in, self.m_out, self.lam, self.T)
            with torch.no_grad():
                e_id, e_ood = energy(logits_id.detach(), self.T), energy(logits_ood.detach(), self.T)
                logs = {"loss": loss.detach(), "ce": ce.detach(), "reg": reg.detach(),
                        "energy_id": e_id.mean(), "energy_ood": e_ood.mean(),
                        "id_inside": (e_id <= self.m_in).float().mean(),
                        "ood_inside": (e_ood >= self.m_out).float().mean()}
        else:
            n_out = logits.shape[1]
            loss = extra_class_loss(logits_id, y, logits_ood, 1.0)
            with torch.no_grad():
                logs = {"loss": loss.detach(), "ce": F.cross_entropy(logits_id.detach(), y),
                        "ood_rejected": (logits_ood.detach().argmax(1) == n_out - 1).float().mean()}
        with torch.no_grad():
            scores = logits_id.detach() if self.mode == "energy" else logits_id.detach()[:, :-1]
            logs["acc"] = (scores.argmax(1) == y).float().mean()
        return loss, logs


__all__ = ["CMGObjective"]
