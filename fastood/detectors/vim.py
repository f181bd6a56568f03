"""ViM (Wang, Li, Feng, Zhang, CVPR 2022): Virtual-logit Matching."""
import torch

from ._feature_hooks import final_linear, is_logits, linear_input
from .base import Detector, eval_mode


def default_principal_dim(num_features: int) -> int:
    """The principal-subspace dimension D for features of width N: 1000 if N >= 2048, 512 if N >= 768, else N // 2.

    The paper picks D per backbone (D = 1000 for its N = 2048 BiT / ResNet features, D = 512 for its N = 768
    ViT / DeiT / Swin features); below 768 fastood takes half the width, as pytorch-ood falls back to when D
    exceeds N."""
    if num_features >= 2048:
        return 1000
    if num_features >= 768:
        return 512
    return max(1, num_features // 2)


class ViM(Detector):
    """Virtual-logit Matching (Wang et al., CVPR 2022, Sec. 3). With penultimate features x [B, N] (the input of the
    final linear layer ``logits = W x + b``), the origin ``u = -pinv(W) b``, the principal subspace P spanned by
    the eigenvectors of the D largest eigenvalues of ``(1/n) sum_i (x_i - u)(x_i - u)^T`` over the ID training
    data (paper Eq. 4) and R its orthogonal complement (the other N - D eigenvectors):

        virtual logit  ``l_0(x) = alpha ||R^T (x - u)||``,   ``alpha = sum_i max_j l_ij / sum_i ||R^T (x_i - u)||``
                       (Eq. 6, sums over the ID training images i)
        score          ``= l_0(x) - logsumexp_j l_j(x)``   (higher = more OOD).

    The paper's score is the virtual class's softmax probability ``e^{l_0} / (e^{l_0} + sum_j e^{l_j})`` =
    ``sigmoid(score)``: the same ranking; fastood returns its logit, which does not saturate at 1 (as OpenOOD's
    ``VIMPostprocessor``, whose confidence is ``-score``, and pytorch-ood's ``ViM``, whose output is ``score``).

    Args:
        model: a classifier; its logits must be ``head(x)`` of a final ``nn.Linear``.
        D: principal-subspace dimension, 1 <= D < N; default None = :func:`default_principal_dim` (the paper's
            1000 for N >= 2048, 512 for N >= 768; N // 2 below). Tuning grid: :attr:`grid` (each D needs its own
            fit: give ``fit_loader`` to :func:`fastood.detectors.tune_detector`).
        head: name of the final ``nn.Linear`` in ``model.named_modules()`` (default: found as
            :func:`fastood.models.split_head` does; TypeError when there is none).

    ``fit(loader)`` reads ID training data (labels unused) **twice**: pass 1 streams the float64 second moment of
    ``x - u`` (O(N^2) memory) and ``sum max_j l_j``; pass 2 streams ``sum ||R^T (x - u)||``, which needs R from the
    whole of pass 1 (so the loader must be re-iterable; a generator raises). Memory does not grow with the number
    of images. Features, logits (``W x + b`` in float64) and norms are float64. After fitting: ``u`` [N],
    ``residual`` R [N, N - D], ``alpha``. ``predict_class`` is the model's argmax.

    References: OpenOOD's ``VIMPostprocessor`` computes the same u, second moment (sklearn
    ``EmpiricalCovariance(assume_centered=True)`` of ``x - u``), eigen-split (``np.linalg.eig``, sorted) and alpha
    (mean max logit / mean residual norm = the ratio of sums), from training features held in memory; its
    confidence is ``-score``. pytorch-ood 0.4.0's ``ViM`` is the same in float32 (its ``d`` is D; it halves a
    ``d`` larger than N with a warning, where fastood raises); ``tests/test_detectors_posthoc_b.py`` compares
    against its recorded outputs (alpha to 1e-5, scores to 1e-4). fastood differs in holding no features (two
    passes instead) and in float64.
    """

    hyperparameters = ("D",)

    def __init__(self, model, D: int = None, head: str = None, **batch_options):
        super().__init__(model, **batch_options)
        self._head_name, self.head = final_linear(model, "ViM", head)
        self.num_features = self.head.in_features
        self.D = default_principal_dim(self.num_features) if D is None else D
        self._check_hyperparameters()
        self.u = self.residual = self.alpha = None

    def _check_hyperparameters(self):
        if isinstance(self.D, bool) or not isinstance(self.D, int) or not 1 <= self.D < self.num_features:
            raise ValueError(f"D must be an int with 1 <= D < {self.num_features} (the feature width; the residual "
                             f"space must not be empty), got {self.D!r}")

    @property
    def grid(self) -> dict:
        """``{"D": [N // 8, N // 4, N // 2, 3 N // 4]}`` (distinct values in [1, N)) for this model's width N."""
        n = self.num_features
        return {"D": sorted({d for d in (n // 8, n // 4, n // 2, 3 * n // 4) if 1 <= d < n})}

    def replace(self, **params) -> "ViM":
        """A copy with other hyperparameters; a new ``D`` needs a new fit (the copy is unfitted)."""
        new = super().replace(**params)
        if new.D != self.D:
            new.u = new.residual = new.alpha = None
        return new

    def _logits(self, z):
        w = self.head.weight.detach().double()
        b = self.head.bias.detach().double() if self.head.bias is not None else z.new_zeros(w.shape[0])
        return z @ w.T + b

    def _features(self, x):
        return linear_input(self.model, x, self.head, self._head_name, "ViM")

    def _batches(self, loader, progress, desc):
        from tqdm.auto import tqdm

        reader = self.batch_reader.unlabeled(loader, "ViM.fit's loader (ID training data)")
        for images, _ in tqdm(reader, desc=desc, disable=not progress, leave=False):
            x = self._prepare(images)
            if x.shape[0]:
                yield self._features(x)[0]

    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "ViM":
        """Origin u, residual space R and alpha from ID training images (two passes over ``loader``)."""
        w = self.head.weight.detach().double()
        b = self.head.bias.detach().double() if self.head.bias is not None else w.new_zeros(w.shape[0])
        u = -(torch.linalg.pinv(w) @ b)
        n, second, max_logit_sum = 0, None, 0.0
        with eval_mode(self.model):
            for z in self._batches(loader, progress, "ViM fit (1/2)"):
                c = z - u.to(z.device)
                second = c.T @ c if second is None else second + c.T @ c
                max_logit_sum += float(self._logits(z).amax(dim=1).sum())
                n += z.shape[0]
            if n == 0:
                raise ValueError("ViM.fit: the loader yielded no samples")
            cov = second / n
            eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))   # ascending
            residual = eigvecs[:, : self.num_features - self.D]          # the N - D smallest directions
            n2, norm_sum = 0, 0.0
            for z in self._batches(loader, progress, "ViM fit (2/2)"):
                norm_sum += float(((z - u.to(z.device)) @ residual).norm(dim=1).sum())
                n2 += z.shape[0]
        if n2 != n:
            raise ValueError(f"ViM.fit reads the loader twice (alpha needs the residual space of all the data) but "
                             f"the second pass gave {n2} images, the first {n}: give a re-iterable loader (e.g. a "
                             "DataLoader or a list), not a generator")
        if norm_sum <= 0:
            raise ValueError(f"ViM.fit: the training features have no component outside the top-{self.D} principal "
                             "subspace (zero residual norms), so alpha is undefined; use a smaller D")
        self.u, self.residual, self.alpha = u, residual, max_logit_sum / norm_sum
        return self

    def _score_and_predict(self, x):
        if self.alpha is None:
            raise RuntimeError("ViM detector is not fitted: call fit(id_train_loader) first")
        z, output = self._features(x)
        logits = self._logits(z)
        virtual = self.alpha * ((z - self.u.to(z.device)) @ self.residual.to(z.device)).norm(dim=1)
        score = virtual - torch.logsumexp(logits, dim=1)
        predictions = output.argmax(dim=1) if is_logits(output) else logits.argmax(dim=1)
        return score.float(), predictions
