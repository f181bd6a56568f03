"""DRF (Zisselman & Tamar, CVPR 2020, "Deep residual flow for out of distribution detection"): per layer and class,
a normalizing flow whose linear part is the class-conditional Gaussian of the Mahalanobis detector and whose
residual part, a RealNVP stack initialized to the identity, is fitted by maximum likelihood; the score is the
negative log-likelihood of the most likely class."""
import math

import torch
from torch import nn

from ._feature_hooks import forward_with_taps, is_logits, pool_features, resolve_layers
from ._streaming import check_labels, check_unfitted
from .base import Detector, eval_mode


class _Coupling(nn.Module):
    """Affine coupling (RealNVP) on [B, D], data -> latent: ``z = m*u + (1-m) * (u - t(m*u)) * exp(-s(m*u))``,
    log-det ``-sum (1-m) s``; ``s = rescale * tanh(net_s)``. The last layers start at zero: the identity."""

    def __init__(self, mask: torch.Tensor, hidden: int):
        super().__init__()
        d = mask.numel()
        self.register_buffer("mask", mask)

        def net():
            layers = nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                                   nn.Linear(hidden, d))
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
            return layers

        self.s, self.t = net(), net()
        self.rescale = nn.Parameter(torch.ones(d))

    def forward(self, u):
        keep = u * self.mask
        free = 1.0 - self.mask
        s = self.rescale * torch.tanh(self.s(keep)) * free
        t = self.t(keep) * free
        return keep + free * (u - t) * torch.exp(-s), -s.sum(dim=1)


class ResidualFlow(nn.Module):
    """One class's flow on whitened features u [B, D] -> ``(latent z [B, D], log|det dz/du| [B])``: ``couplings``
    affine couplings with alternating half masks and a fixed random permutation after every second one (the
    authors' RealNVP of ``lib_generation``), the identity at initialization."""

    def __init__(self, dim: int, couplings: int = 10, hidden: int = None, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        first = (torch.arange(dim) < dim // 2).double()
        self.layers = nn.ModuleList(_Coupling(first if i % 2 == 0 else 1.0 - first, hidden or dim)
                                    for i in range(couplings))
        self.register_buffer("perms", torch.stack([torch.randperm(dim, generator=generator)
                                                   for _ in range((couplings + 1) // 2)]) if couplings else
                             torch.zeros(0, dim, dtype=torch.long))

    def forward(self, u):
        logdet = u.new_zeros(u.shape[0])
        for i, layer in enumerate(self.layers):
            u, ld = layer(u)
            logdet = logdet + ld
            if i % 2 == 1:
                u = u[:, self.perms[i // 2]]
        return u, logdet


class DRF(Detector):
    """score = ``sum_l -max_c log p_{l,c}(z_l)`` (higher = more OOD), the class-conditional log-likelihood of the
    pooled features z_l of each chosen layer under the residual flow (the paper's change of variables):

        ``log p_{l,c}(z) = log N(f_{l,c}(A_l (z - mu_{l,c})); 0, I) + log|det df_{l,c}/du| + log|det A_l|``,

    with ``mu_{l,c}`` the class means, ``A_l = Lambda^{-1/2} V^T`` the whitening of the tied within-class covariance
    ``Sigma_l = V Lambda V^T`` (so with ``f = identity`` this is the Gaussian of the Mahalanobis detector) and
    ``f_{l,c}`` a RealNVP stack of ``couplings`` affine couplings initialized to the identity and fitted by maximum
    likelihood on class c's training features (Adam). Layers are added without the paper's logistic regression
    (as FIG's MLB row). Input perturbation (the paper's, after Mahalanobis Eq. 4), per layer:
    ``x^_l = x - epsilon * sign(grad_x (-max_c log p_{l,c}(z_l(x))))``, then layer l is scored at x^_l.

    Args:
        model: the classifier (its argmax is ``predict_class`` when it returns logits [B, C]).
        layers: module names whose globally average-pooled outputs are the features; default None = the
            penultimate features.
        epsilon: perturbation size, default 0 (off). The paper tunes it per data set on validation data;
            ``tuning_grid`` = the authors' list {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01} plus FIG's
            0.0025 / 0.05.
        couplings: coupling layers per flow (authors: 10). hidden: width of their MLPs (default = feature dim,
            the authors' ``length_hidden = 1``).
        epochs, lr, batch_size: maximum-likelihood training of each flow (Adam, no weight decay; fastood's
            compact defaults 20 / 1e-3 / 256 — the authors trained far longer on a GPU). ``epochs=0`` is the
            Gaussian (Mahalanobis-likelihood) detector.
        seed: flow initialization, permutations and minibatch order.

    Memory: DRF cannot stream to a fixed-size summary: its flows are trained for several epochs on the features, so
    ``fit`` holds every training image's pooled features of each layer (N x F_l float64 on the model's device:
    60,000 x 128 = 61 MB), freed after training; afterwards it holds per layer the whitening [R, F], the class means
    [K, F] and K flows (each ``couplings * (2 * (2 F H + H^2) + F)`` parameters, float64). Classes without training
    images are left out. No reference implementation (OpenOOD, pytorch-ood) exists to compare against.

    Cost: ``fit`` takes ``epochs * N_c / batch_size`` Adam steps per class and layer, each a forward and backward
    pass of ``2 * couplings`` MLPs on [batch_size, R] in float64 (F = 128, batch 256: 8.6 s a step measured on the
    2-core development machine at load average 20, not representative; an unloaded or GPU figure is still to be
    measured). For large training sets use a GPU, or fewer epochs / couplings. Scoring runs K flows per layer on
    each batch.
    """

    hyperparameters = ("epsilon",)
    tuning_grid = {"epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0025, 0.005, 0.01, 0.05]}
    score_dtype = torch.float64

    def __init__(self, model, layers=None, epsilon: float = 0.0, couplings: int = 10, hidden: int = None,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, seed: int = 0, **batch_options):
        super().__init__(model, **batch_options)
        self.epsilon = epsilon
        self._check_hyperparameters()
        for name, value, low in (("couplings", couplings, 0), ("epochs", epochs, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be an int >= 1 or None, got {hidden!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.couplings, self.hidden, self.epochs, self.lr, self.batch_size = couplings, hidden, epochs, lr, batch_size
        self.seed = int(seed)
        self._taps = resolve_layers(model, layers, "DRF")
        self.layers = [name for name, _, _ in self._taps]
        self.classes = None     # [K] class indices with training images
        self.means = None       # per layer [K, F]
        self.whiten = None      # per layer A [R, F]
        self.log_det_whiten = None  # per layer log|det A| (float)
        self.flows = None       # per layer nn.ModuleList of K ResidualFlow
        self.train_log_likelihood = None  # per layer: mean training log-likelihood after fitting

    def _check_hyperparameters(self):
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        self.epsilon = float(self.epsilon)

    @property
    def needs_input_grad(self) -> bool:
        return self.epsilon > 0

    # ------------------------------------------------------------------ fitting
    def fit(self, loader, progress: bool = False) -> "DRF":
        """Class means, tied covariance and one flow per class and layer, from labeled ID training data."""
        from tqdm.auto import tqdm

        feats, labels = None, []
        with eval_mode(self.model), torch.no_grad():
            for images, y in tqdm(self.batch_reader.labeled(loader, "DRF.fit's loader (labeled ID training data)"),
                                  desc="DRF features", disable=not progress, leave=False):
                x = self._prepare(images)
                y = check_labels(x, y, "DRF")
                if y.numel() == 0:
                    continue
                f, _ = self._features(x)
                feats = [[t] for t in f] if feats is None else [acc + [t] for acc, t in zip(feats, f)]
                labels.append(y)
        if feats is None:
            raise ValueError("DRF.fit: the loader yielded no samples")
        y = torch.cat(labels)
        counts = torch.bincount(y)
        self.classes = torch.nonzero(counts > 0).flatten()
        self.means, self.whiten, self.log_det_whiten, self.flows, self.train_log_likelihood = [], [], [], [], []
        for li, (name, parts) in enumerate(zip(self.layers, feats)):
            z = torch.cat(parts)
            del parts
            means = torch.stack([z[y == c].mean(0) for c in self.classes.tolist()])
            centered = z - means[torch.searchsorted(self.classes, y)]
            cov = centered.T @ centered / z.shape[0]
            eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
            keep = eigvals > eigvals.abs().max() * cov.shape[0] * torch.finfo(torch.float64).eps
            if not keep.any():
                raise ValueError(f"DRF.fit: the features of layer {name!r} do not vary within classes")
            whiten = (eigvecs[:, keep] / eigvals[keep].sqrt()).T                  # [R, F]
            self.means.append(means)
            self.whiten.append(whiten)
            self.log_det_whiten.append(float(-0.5 * torch.log(eigvals[keep]).sum()))
            flows = nn.ModuleList(ResidualFlow(whiten.shape[0], self.couplings, self.hidden,
                                               seed=self.seed + 1000 * li + int(c))
                                  for c in self.classes.tolist()).to(device=z.device, dtype=torch.float64)
            u = centered @ whiten.T
            lls = []
            for k, c in enumerate(tqdm(self.classes.tolist(), desc=f"DRF flows {name}", disable=not progress,
                                       leave=False)):
                lls.append(self._train_flow(flows[k], u[y == c], seed=self.seed + 1000 * li + c))
            self.flows.append(flows)
            self.train_log_likelihood.append(float(torch.cat(lls).mean()) + self.log_det_whiten[-1])
        return self

    def _train_flow(self, flow, u, seed):
        generator = torch.Generator().manual_seed(seed)
        if self.epochs and self.couplings:
            opt = torch.optim.Adam(flow.parameters(), lr=self.lr)
            with torch.enable_grad():
                for _ in range(self.epochs):
                    order = torch.randperm(u.shape[0], generator=generator).to(u.device)
                    for start in range(0, u.shape[0], self.batch_size):
                        batch = u[order[start:start + self.batch_size]]
                        loss = -self._log_normal_flow(flow, batch).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
        flow.requires_grad_(False)
        with torch.no_grad():
            return self._log_normal_flow(flow, u)

    @staticmethod
    def _log_normal_flow(flow, u):
        """``log N(f(u); 0, I) + log|det df/du|`` [B]."""
        z, logdet = flow(u)
        return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet

    # ------------------------------------------------------------------ scoring
    def log_likelihoods(self, feats):
        """Per layer, ``log p_{l,c}(z_l)`` [B, K] (float64) of pooled features (one [B, F_l] per layer)."""
        check_unfitted(self.flows, "DRF")
        return [self._layer_log_likelihood(layer, f) for layer, f in enumerate(feats)]

    def _layer_log_likelihood(self, layer, f):
        f, means, whiten = f.double(), self.means[layer], self.whiten[layer]
        cols = [self._log_normal_flow(flow, (f - means[k]) @ whiten.T) for k, flow in enumerate(self.flows[layer])]
        return torch.stack(cols, 1) + self.log_det_whiten[layer]

    def _features(self, x):
        """(per-layer pooled features [B, F_l] float64, model output) from one forward pass."""
        return forward_with_taps(self.model, x, self._taps, "DRF", reduce=lambda t: pool_features(t, "DRF").clone())

    def _score_and_predict(self, x):
        check_unfitted(self.flows, "DRF")
        if self.epsilon == 0:
            feats, output = self._features(x)
            total = sum(-ll.amax(1) for ll in self.log_likelihoods(feats))
        else:
            x_grad = x.detach().requires_grad_(True)
            feats, output = self._features(x_grad)
            nll = [-ll.amax(1) for ll in self.log_likelihoods(feats)]
            total = 0
            for layer, d in enumerate(nll):
                (grad,) = torch.autograd.grad(d.sum(), x_grad, retain_graph=layer < len(nll) - 1)
                with torch.no_grad():
                    feats_hat, _ = self._features(x - self.epsilon * grad.sign())
                    total = total - self._layer_log_likelihood(layer, feats_hat[layer]).amax(1)
        return total.detach(), output.detach().argmax(dim=1) if is_logits(output) else None
