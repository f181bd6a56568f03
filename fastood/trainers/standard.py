"""Plain cross-entropy training: the pretrained baseline every method starts from."""
import torch
import torch.nn.functional as F

from .base import Trainer


class StandardTrainer(Trainer):
    """Minimize ``CE(f(x), y)`` on labeled ID batches ``(x, y)``. Detector: MSP.

    Defaults as the papers pretrain: SGD lr 0.1, momentum 0.9, weight decay 5e-4, LR divided by 10 at 50% and
    75% of the training steps.
    """

    def configure_scheduler(self, optimizer, total_steps):
        milestones = sorted({max(1, total_steps // 2), max(1, (3 * total_steps) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def training_step(self, batch):
        x, y = batch[0], batch[1]
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}
