"""Training the conditional VAE that the manifold sampler and CMG draw their outliers from."""
import torch

from .base import Trainer


class CVAETrainer(Trainer):
    """Minimizes the negative ELBO ``recon + kl_weight * KL`` of a :class:`fastood.models.ConditionalVAE` on
    labeled batches ``(x, y)`` (see :meth:`ConditionalVAE.loss_terms`).

    Optimizer: Adam (lr 1e-3, no weight decay) unless ``optimizer=`` is given; the rest (checkpoints, exact
    resume, progress bar, step budget) is the :class:`~fastood.trainers.base.Trainer`'s. ``history`` logs
    ``loss``, ``recon`` and ``kl`` per step (batch means).

    Args:
        cvae: the model to train.
        weight_decay: Adam's weight decay (default 0).
        **kwargs: the Trainer options (lr, optimizer, checkpoint_dir, checkpoint_every, progress, seed, device, ...).
    """

    default_lr = 1e-3

    def __init__(self, cvae, weight_decay=0.0, **kwargs):
        if not callable(getattr(cvae, "loss_terms", None)):
            raise TypeError(f"cvae must have loss_terms(x, y) (a fastood.models.ConditionalVAE), got "
                            f"{type(cvae).__name__}")
        super().__init__(cvae, weight_decay=weight_decay, **kwargs)

    def configure_optimizer(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def training_step(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("CVAETrainer needs labeled batches (x, y)")
        x, y = batch[0], batch[1]
        if x.shape[0] == 0:
            raise ValueError("CVAETrainer got an empty batch")
        terms = self.net(x, y, return_terms=True)
        return {"loss": terms["loss"], "recon": terms["recon"].detach(), "kl": terms["kl"].detach()}

    def detector(self):
        raise TypeError("CVAETrainer trains a generator, not a classifier: it has no OOD detector. Use the CVAE "
                        "with ManifoldTrainer or CMGTrainer.")
