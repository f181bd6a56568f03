"""DRF (Zisselman & Tamar, CVPR 2020, "Deep residual flow for out of distribution detection"): per layer and class,
a normalizing flow whose linear part is the class-conditional Gaussian of the Mahalanobis detector and whose
residual part, a RealNVP stack initialized to the identity, is fitted by maximum likelihood; the score is the
negative log-likelihood of the most likely class."""
import math

import torch
from torch import nn

from ._feature_hooks import forward_with_taps, is_logits, pool_features, resolve_layers
from ._perturbation import InputPerturbation
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


_EVAL_ROWS = 4096      # rows per class and chunk when evaluating the trained flows on their training features


class _StackedFlows:
    """The K ``ResidualFlow`` modules of one layer as stacked tensors, so that all K run at once as batched matrix
    products (``torch.baddbmm``) instead of K Python-level module calls. The modules stay the source of truth
    (state_dict, ``DRF.flows``); this is a float-level re-arrangement of the same computation:

    * every flow of a layer has the same masks (the alternating halves), so each coupling's MLPs read only the kept
      coordinates and write only the free ones: the first Linear's weight is stored restricted to the kept input
      columns, the last Linear's weight and bias and ``rescale`` to the free output rows, transposed to
      ``[K, in, out]``. The coordinates left out are exact zeros in ``_Coupling.forward`` (``u * mask``,
      ``... * (1 - mask)``), and so are their gradients, so Adam never moves those entries either;
    * ``z = [kept | transformed]`` is put back in coordinate order and, after every second coupling, permuted by
      each class's own permutation, as one ``gather`` per coupling with the composed index ``[K, D]``.

    Parameter layout (``self.params``): per coupling 13 tensors ``s.W1 [K, Dk, H], s.b1 [K, 1, H], s.W2 [K, H, H],
    s.b2 [K, 1, H], s.W3 [K, H, Df], s.b3 [K, 1, Df]``, the same six for ``t``, and ``rescale [K, 1, Df]``
    (``Dk`` kept and ``Df = D - Dk`` free coordinates)."""

    PER_COUPLING = 13

    def __init__(self, flows):
        first = flows[0]
        self.dim = first.perms.shape[1]
        self.couplings = len(first.layers)
        self.keep, self.free, self.take, self.index, self.params, self.sources = [], [], [], [], [], []
        for i in range(self.couplings):
            mask = first.layers[i].mask
            if any(not torch.equal(flow.layers[i].mask, mask) for flow in flows):
                raise ValueError("DRF: the flows of one layer must share their coupling masks")
            keep, free = torch.nonzero(mask).flatten(), torch.nonzero(mask == 0).flatten()
            inverse = torch.argsort(torch.cat([keep, free]))          # [kept | free] -> coordinate order
            if i % 2 == 1:
                index = torch.stack([inverse[flow.perms[i // 2]] for flow in flows])            # [K, D]
            else:
                index = None if torch.equal(inverse, torch.arange(self.dim, device=inverse.device)) else \
                    inverse.expand(len(flows), -1)
            self.keep.append(keep)
            self.take.append(tuple(_as_slice(ix) for ix in (keep, free)))
            self.free.append(free)
            self.index.append(index)
            for net in ("s", "t"):
                seqs = [getattr(flow.layers[i], net) for flow in flows]
                self.params += [torch.stack([q[0].weight[:, keep].T for q in seqs]),
                                torch.stack([q[0].bias for q in seqs])[:, None],
                                torch.stack([q[2].weight.T for q in seqs]),
                                torch.stack([q[2].bias for q in seqs])[:, None],
                                torch.stack([q[4].weight[free].T for q in seqs]),
                                torch.stack([q[4].bias[free] for q in seqs])[:, None]]
            self.params.append(torch.stack([flow.layers[i].rescale[free] for flow in flows])[:, None])
        self.params = [p.detach().contiguous() for p in self.params]
        self.sources = [(t, t._version) for t in _flow_tensors(flows)]

    def is_current(self, flows) -> bool:
        """Whether ``flows`` are still the modules (same tensors, not modified in place) this was built from."""
        tensors = _flow_tensors(flows)
        return len(tensors) == len(self.sources) and all(
            t is s and t._version == v for t, (s, v) in zip(tensors, self.sources))

    def write_back(self, flows):
        """Copy the (trained) stacked parameters into the modules' parameters."""
        with torch.no_grad():
            for i in range(self.couplings):
                keep, free = self.keep[i], self.free[i]
                p = self.params[self.PER_COUPLING * i:self.PER_COUPLING * (i + 1)]
                for k, flow in enumerate(flows):
                    layer = flow.layers[i]
                    for j, net in enumerate((layer.s, layer.t)):
                        w1, b1, w2, b2, w3, b3 = p[6 * j:6 * j + 6]
                        net[0].weight[:, keep] = w1[k].T
                        net[0].bias.copy_(b1[k, 0])
                        net[2].weight.copy_(w2[k].T)
                        net[2].bias.copy_(b2[k, 0])
                        net[4].weight[free] = w3[k].T
                        net[4].bias[free] = b3[k, 0]
                    layer.rescale[free] = p[12][k, 0]

    def forward(self, u, params=None, classes=None):
        """All K (or the ``classes`` [A] subset of) flows at once: u [A, B, D] (row a goes through flow
        ``classes[a]``) -> ``(z [A, B, D], log|det dz/du| [A, B])``; ``params`` default ``self.params`` (else
        already restricted to ``classes``)."""
        params = self.params if params is None else params
        logdet = u.new_zeros(u.shape[:2])
        for i in range(self.couplings):
            w = params[self.PER_COUPLING * i:self.PER_COUPLING * (i + 1)]
            kept, free = u[..., self.take[i][0]], u[..., self.take[i][1]]
            s, t = _mlp(kept, w[0:6]), _mlp(kept, w[6:12])
            s = w[12] * torch.tanh(s)
            u = torch.cat([kept, (free - t) * torch.exp(-s)], 2)
            logdet = logdet - s.sum(2)
            index = self.index[i]
            if index is not None:
                index = index if classes is None else index[classes]
                u = u.gather(2, index[:, None, :].expand(-1, u.shape[1], -1))
        return u, logdet

    def log_normal(self, u, params=None, classes=None):
        """``log N(f_k(u); 0, I) + log|det df_k/du|`` [A, B] for u [A, B, D]: each class's
        ``ResidualFlow`` applied to its row, all K at once (tests/test_drf_batched.py holds it to the per-module loop)."""
        z, logdet = self.forward(u, params, classes)
        return -0.5 * (z * z).sum(2) - 0.5 * z.shape[2] * math.log(2 * math.pi) + logdet


def _as_slice(index):
    """A contiguous index [n] as a slice (a view, cheaper than gathering), else the index itself."""
    if index.numel() and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + index.numel(),
                                                         device=index.device)):
        return slice(int(index[0]), int(index[0]) + index.numel())
    return index


def _flow_tensors(flows):
    return [t for flow in flows for t in list(flow.parameters()) + list(flow.buffers())]


def _mlp(x, w):
    """Linear-LeakyReLU-Linear-LeakyReLU-Linear on x [A, B, in] with stacked weights [A, in, out], biases [A, 1, out]."""
    x = torch.nn.functional.leaky_relu(torch.baddbmm(w[1], x, w[0]), inplace=True)
    x = torch.nn.functional.leaky_relu(torch.baddbmm(w[3], x, w[2]), inplace=True)
    return torch.baddbmm(w[5], x, w[4])


def _padded(rows):
    """A list of A tensors [n_a, D] -> (zero-padded [A, max n_a, D], lengths [A])."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), [r.shape[0] for r in rows]


class DRF(InputPerturbation, Detector):
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
    [K, F] and K flows (each ``couplings * (2 * (2 F H + H^2) + F)`` parameters, float64; once more as the stacked
    copy that scoring uses, rebuilt when the modules change). Classes without training
    images are left out. No reference implementation (OpenOOD, pytorch-ood) exists to compare against.

    Cost: ``fit`` takes ``epochs * ceil(N_c / batch_size)`` Adam steps per class and layer, each a forward and
    backward pass of ``2 * couplings`` MLPs on [batch_size, R] in float64. The K flows of a layer run as one batched
    model (``_StackedFlows``: stacked weights, ``torch.baddbmm``), in ``fit`` (a per-class Adam: each class's
    trajectory is exactly the one of training its flow alone, see ``_train_flows``) and in scoring; its MLPs read
    only the kept half and write only the free half of each coupling (a third fewer multiply-adds than the
    modules, same values). ``bench/drf_batched_speed.py``, K = 10, F = H = 128, couplings 10, batch 256, float64, one
    torch thread, on the 2-core development machine shared with another job (ratios from round-robin runs in one
    process; absolute figures only indicative): fitting 6,000 features per class for 2 epochs 23 s (the old
    class-by-class loop 39 s, 1.7x), log-likelihoods of 2,600 feature vectors/s (the CNN excluded), 1,030/s with
    their input gradient (input perturbation's backward) (old per-flow loop 1.65x / 1.8x slower); F = H = 64:
    2.1x / 1.9x / 1.9x. ``torch.func.vmap`` over
    ``stack_module_state`` was no faster than the old loop (0.8-1.07x). On a busy CPU use one thread
    (``torch.set_num_threads(1)``): with two threads the same scoring pass ran 15x slower there (OpenMP threads
    waiting for a busy core), which likely explains an earlier reading of 8.6 s a step at load average 20.
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
        self._stacked = None    # per layer _StackedFlows of ``flows`` (rebuilt when they change)

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
        self._stacked = [None] * len(self.layers)
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
            self.flows.append(flows)
            ll = self._train_flows(li, [u[y == c] for c in self.classes.tolist()],
                                   [self.seed + 1000 * li + c for c in self.classes.tolist()], name, progress)
            self.train_log_likelihood.append(float(ll.mean()) + self.log_det_whiten[-1])
        return self

    def _train_flows(self, layer, us, seeds, name="", progress=False):
        """Maximum-likelihood training of layer ``layer``'s K flows on their classes' whitened features ``us``
        (K tensors [N_k, R]), all K at once as one batched model (``_StackedFlows``) with a per-class Adam.

        Each class follows exactly the trajectory of training its flow alone with ``torch.optim.Adam`` (as fastood
        did before; ``tests/test_drf_batched.py`` keeps that loop as the reference): every epoch class k draws its
        minibatch order ``randperm(N_k)`` from its own generator seeded ``seeds[k]``, takes ceil(N_k /
        batch_size) steps on ``-mean`` log-likelihood of its batches, and its Adam moments and step count advance
        only on its own steps. Step j of an epoch runs the classes with more than j batches, their batches
        zero-padded to the longest with weight 0 (their gradients are exact zeros). Returns the trained flows'
        log-likelihoods ``log N(f_k(u); 0, I) + log|det|`` of all training features, classes concatenated [N]."""
        from tqdm.auto import tqdm

        flows = self.flows[layer]
        stacked = _StackedFlows(flows)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if self.epochs and self.couplings:
            beta1, beta2, eps = 0.9, 0.999, 1e-8                     # torch.optim.Adam's defaults
            params = stacked.params
            exp_avg = [torch.zeros_like(p) for p in params]
            exp_avg_sq = [torch.zeros_like(p) for p in params]
            steps = [0] * len(us)
            batches = [-(-u.shape[0] // self.batch_size) for u in us]
            everyone = torch.arange(len(us), device=params[0].device)
            with torch.enable_grad():
                for _ in tqdm(range(self.epochs), desc=f"DRF flows {name}", disable=not progress, leave=False):
                    orders = [torch.randperm(u.shape[0], generator=g).to(u.device) for u, g in zip(us, generators)]
                    for j in range(max(batches)):
                        active = [k for k in range(len(us)) if j < batches[k]]
                        every = len(active) == len(us)
                        idx = everyone if every else torch.tensor(active, device=everyone.device)
                        x, lengths = _padded([us[k][orders[k][j * self.batch_size:(j + 1) * self.batch_size]]
                                              for k in active])
                        weight = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
                        for a, n in enumerate(lengths):
                            weight[a, :n] = 1.0 / n                  # -mean over each class's own batch
                        sub = [(p if every else p[idx]).detach().requires_grad_(True) for p in params]
                        loss = -(stacked.log_normal(x, sub, None if every else idx) * weight).sum()
                        grads = torch.autograd.grad(loss, sub)
                        with torch.no_grad():
                            for k in active:
                                steps[k] += 1
                            step_size = torch.tensor([self.lr / (1 - beta1 ** float(steps[k])) for k in active],
                                                     dtype=x.dtype, device=x.device)
                            bias2_sqrt = torch.tensor([(1 - beta2 ** float(steps[k])) ** 0.5 for k in active],
                                                      dtype=x.dtype, device=x.device)
                            for p, g, m, v, q in zip(params, grads, exp_avg, exp_avg_sq, sub):
                                shape = (-1,) + (1,) * (p.dim() - 1)
                                m_a, v_a = (m, v) if every else (m[idx], v[idx])
                                m_a.lerp_(g, 1 - beta1)
                                v_a.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                                denom = (v_a.sqrt() / bias2_sqrt.view(shape)).add_(eps)
                                q = q.detach()
                                q.add_(m_a * (-step_size).view(shape) / denom)
                                if not every:
                                    m[idx], v[idx], p[idx] = m_a, v_a, q
            stacked.write_back(flows)
        flows.requires_grad_(False)
        self._stacked[layer] = _StackedFlows(flows)
        lls = []
        with torch.no_grad():
            for start in range(0, max(u.shape[0] for u in us), _EVAL_ROWS):
                x, lengths = _padded([u[start:start + _EVAL_ROWS] for u in us])
                lls.append([row[:n] for row, n in zip(self._stacked[layer].log_normal(x), lengths)])
        return torch.cat([part[k] for k in range(len(us)) for part in lls])

    # ------------------------------------------------------------------ scoring
    def log_likelihoods(self, feats):
        """Per layer, ``log p_{l,c}(z_l)`` [B, K] (float64) of pooled features (one [B, F_l] per layer)."""
        check_unfitted(self.flows, "DRF")
        return [self._layer_log_likelihood(layer, f) for layer, f in enumerate(feats)]

    def _layer_log_likelihood(self, layer, f):
        """``log p_{l,c}(z)`` [B, K] of features f [B, F_l]: all K flows at once (``_StackedFlows``); differentiable
        in f (input perturbation)."""
        f, means, whiten = f.double(), self.means[layer], self.whiten[layer]
        if getattr(self, "_stacked", None) is None:
            self._stacked = [None] * len(self.flows)
        stacked = self._stacked[layer]
        if stacked is None or not stacked.is_current(self.flows[layer]):
            stacked = self._stacked[layer] = _StackedFlows(self.flows[layer])
        u = (f[None] - means[:, None]) @ whiten.T                               # [K, B, R]
        return stacked.log_normal(u).T + self.log_det_whiten[layer]

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
