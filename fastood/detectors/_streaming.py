"""Small helpers shared by the fitted detectors: the unfitted-detector error, label checks, and a bounded uniform
random sample of a stream (ReAct's activation values, GM's held-out validation images)."""
import torch


def check_unfitted(value, who: str):
    """RuntimeError ``"<who> detector is not fitted: call fit(id_train_loader) first"`` when ``value`` is None."""
    if value is None:
        raise RuntimeError(f"{who} detector is not fitted: call fit(id_train_loader) first")


def check_labels(x: torch.Tensor, labels: torch.Tensor, who: str) -> torch.Tensor:
    """Labels [B] long on x's device, checked against the batch (count, >= 0)."""
    y = labels.to(x.device).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"{who}.fit: {x.shape[0]} images but {y.numel()} labels in a batch")
    if y.numel() and y.min() < 0:
        raise ValueError(f"{who}.fit: labels must be >= 0, got {int(y.min())}")
    return y


class SmallestKeys:
    """A uniform random sample without replacement of at most ``size`` rows from a stream of batches, in memory
    O(size): every row gets a random key (from a seeded generator) and the rows with the ``size`` smallest keys are
    kept. While fewer than ``size`` rows have been seen, every row is kept (the sample is the whole stream)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.generator = torch.Generator().manual_seed(seed)
        self._keys, self._rows, self._held = [], [], 0
        self.seen = 0

    def add(self, rows: torch.Tensor):
        keys = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64).to(rows.device)
        self.seen += rows.shape[0]
        self._keys.append(keys)
        self._rows.append(rows)
        self._held += rows.shape[0]
        if self._held > 2 * self.size:   # compact now and then: amortized O(1) work per row
            self._compact()

    def _compact(self):
        keys, rows = torch.cat(self._keys), torch.cat(self._rows)
        if rows.shape[0] > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self._keys, self._rows, self._held = [keys], [rows], rows.shape[0]

    def sample(self):
        """The kept rows (at most ``size``; None if nothing was added)."""
        if not self._rows:
            return None
        self._compact()
        return self._rows[0]

    @property
    def complete(self) -> bool:
        """True when every row seen is in the sample."""
        return self.seen <= self.size
