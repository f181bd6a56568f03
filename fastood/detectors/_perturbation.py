"""Input perturbation of the gradient-based detectors (ODIN, Mahalanobis, DRF): one ``epsilon`` check, one rule for
when a detector needs the input gradient."""


class InputPerturbation:
    """Mixin for a :class:`~fastood.detectors.base.Detector` with an ``epsilon`` >= 0 attribute: the size of the
    input step ``x - epsilon * sign(grad_x s(x))`` taken before scoring (ODIN Eq. 2, Mahalanobis Eq. 4); 0 = off.
    List it before ``Detector`` in the bases."""

    epsilon: float

    def _check_hyperparameters(self) -> None:
        epsilon = self.epsilon
        if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    @property
    def needs_input_grad(self) -> bool:
        """True when ``epsilon`` > 0: scoring then takes an input gradient (not under ``torch.no_grad``)."""
        return self.epsilon > 0
