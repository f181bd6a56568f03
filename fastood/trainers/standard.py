"""Plain cross-entropy training: the pretrained baseline every method starts from."""
import torch.nn.functional as F

from .base import Trainer


class StandardTrainer(Trainer):
    """Minimize ``CE(f(x), y)`` on labeled ID batches ``(x, y)``. Detector: MSP.

    Defaults: SGD lr 0.1, momentum 0.9, weight decay 5e-4.
    """

    def training_step(self, batch):
        x, y = batch[0], batch[1]
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}
