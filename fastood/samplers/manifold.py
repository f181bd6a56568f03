"""Manifold outliers from a conditional VAE (Vernekar et al. 2019, "Out-of-distribution detection in classifiers
via generation"): type I lie off the data manifold, type II on it but at the edge of each class.

Type I: ``x~ = clip(x + beta v)`` with ``v`` a random unit vector in the left null space of the decoder Jacobian
``J = dg/dz`` at the mean encoding of x (``v`` is orthogonal to every direction the decoder can move in).
Type II: decode latent points on the surface of the ellipsoid that holds ``coverage`` (95%) of a class's latent
means, conditioned on that class (the text), or -- the default -- the authors' notebooks' draw, which lands beyond it
(:func:`authors_ellipsoid_factor`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastood import ops
from fastood._hyperparameters import RecordsHyperparameters
from fastood.batches import model_device

from ._model_state import frozen
from .noise import bound_tensor, check_bounds, check_count, check_shape


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_cvae(cvae, attrs) -> None:
    """TypeError unless ``cvae`` is an nn.Module with every attribute in ``attrs`` (as ConditionalVAE has)."""
    if not isinstance(cvae, nn.Module):
        raise TypeError(f"cvae must be a torch.nn.Module (a ConditionalVAE), got {type(cvae).__name__}")
    for attr in attrs:
        if not hasattr(cvae, attr):
            raise TypeError(f"cvae must provide {attr!r} (as fastood.models.ConditionalVAE does); "
                            f"{type(cvae).__name__} does not")


JACOBIAN_METHODS = ("auto", "tangents", "func")


def decoder_jacobian(cvae: nn.Module, z: torch.Tensor, cond, chunk_size=None, method="auto"):
    """Jacobians ``J_b = d g(z_b, c_b) / d z_b`` of the decoder for a whole batch by forward-mode AD.

    One JVP per latent basis vector e_1..e_d, each pushed through the decoder for all B samples at once (d
    forward-mode passes, not D backward passes). The decoder must act on each sample independently (no batch
    statistics), as :class:`ConditionalVAE` does. Two implementations of the same forward mode:

    - ``"tangents"``: for a :class:`~fastood.models.ConditionalVAE` whose decoder holds only Linear, Conv2d,
      ConvTranspose2d, ReLU, LeakyReLU and Identity layers (and a tanh or linear output): the d tangents travel as one
      batch of d*B through the decoder's own layers -- each linear layer applied without its bias, each activation
      as its derivative at the primal (a mask for ReLU, ``1 - g^2`` for the tanh output), the convolutions in
      channels-last memory -- next to one primal pass that supplies those derivatives.
    - ``"func"``: ``torch.func.vmap`` over ``torch.func.jvp`` of ``decode`` (any decoder; its ``chunk_size``).
    - ``"auto"`` (default): ``"tangents"`` where it applies, else ``"func"``. The two agree to float rounding
      (tests/test_manifold.py); ``"tangents"`` avoids functorch's per-operator dispatch and batching rules
      (bench/bench_nullspace.py).

    Args:
        cvae: a model with ``decode(z [B, d], cond) -> [B, ...]`` (e.g. :class:`fastood.models.ConditionalVAE`).
        z: latents [B, d].
        cond: what ``decode`` takes as condition (labels or vectors, not differentiated).
        chunk_size: passed to ``vmap`` (how many basis vectors per pass; None = all d at once); ``"func"`` only
            (given, it selects ``"func"`` under ``"auto"``).
        method: ``"auto"``, ``"tangents"`` or ``"func"``.
    Returns:
        ``(J [B, D, d], g [B, D])``: the Jacobians (contiguous) and the decoded images flattened (D = prod of the
        image shape).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a floating-point latent tensor [B, d], got {got}")
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"method must be one of {JACOBIAN_METHODS}, got {method!r}")
    supported = _tangent_layers(cvae)
    if method == "tangents" and supported is None:
        raise ValueError(f"method='tangents' needs a ConditionalVAE with Linear/Conv2d/ConvTranspose2d/ReLU/LeakyReLU/"
                         f"Identity decoder layers and its own decode; {type(cvae).__name__} is not: use 'func'")
    if method == "tangents" or (method == "auto" and supported is not None and chunk_size is None):
        return _jacobian_by_tangents(cvae, z, cond, *supported)
    return _jacobian_by_func(cvae, z, cond, chunk_size)


def _jacobian_by_func(cvae, z, cond, chunk_size):
    b, d = z.shape

    def decode_flat(latent):
        return cvae.decode(latent, cond).flatten(1)

    def push_forward(tangent):
        return torch.func.jvp(decode_flat, (z,), (tangent,))

    basis = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, b, d)
    images, tangents = torch.func.vmap(push_forward, chunk_size=chunk_size)(basis)  # [d, B, D] each
    return tangents.permute(1, 2, 0).contiguous(), images[0]


_TANGENT_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.LeakyReLU, nn.Identity)


def _tangent_layers(cvae):
    """``(fc layers, conv layers)`` when the ``"tangents"`` Jacobian applies to ``cvae``, else None: a
    ConditionalVAE whose ``decode``/``decode_preactivation``/``condition`` are the class's own and whose decoder
    holds only the layer types the tangent pass knows (all of them act per sample)."""
    from fastood.models.cvae import ConditionalVAE

    if not isinstance(cvae, ConditionalVAE):
        return None
    cls = type(cvae)
    if any(getattr(cls, name) is not getattr(ConditionalVAE, name)
           for name in ("decode", "decode_preactivation", "condition", "class_vectors")):
        return None
    fc, conv = getattr(cvae, "decoder_fc", None), getattr(cvae, "decoder_conv", None)
    if not isinstance(fc, nn.Sequential) or not isinstance(conv, nn.Sequential) or cvae.output not in ("tanh",
                                                                                                       "linear"):
        return None
    layers = list(fc) + list(conv)
    if not all(type(m) in _TANGENT_LAYERS for m in layers):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in layers + [cvae, fc, conv]):
        return None   # hooks would see the tangent batch or be skipped: let torch.func run the real modules
    if not isinstance(fc[0], nn.Linear):
        return None
    return list(fc), list(conv)


def _tangent_step(module, h, t, d):
    """One layer of the tangent pass: ``(module(h), J_module(h) t)``; h [B, ...] primal, t [d * B, ...] tangents
    (d blocks of B rows)."""
    if isinstance(module, nn.Identity):
        return h, t
    if isinstance(module, nn.Linear):
        return module(h), F.linear(t, module.weight)
    if isinstance(module, nn.Conv2d):
        return module(h), module._conv_forward(t, module.weight, None)
    if isinstance(module, nn.ConvTranspose2d):
        out = module(h)
        return out, F.conv_transpose2d(t, module.weight, None, module.stride, module.padding, module.output_padding,
                                       module.groups, module.dilation)
    # elementwise: ReLU / LeakyReLU, derivative taken at the primal input, broadcast over the d tangent blocks and
    # applied in place (t is always this pass's own tensor; splitting dim 0 into (d, B) is a view in any layout).
    # A float slope, not a bool mask: multiplying by a bool tensor costs a type promotion per element.
    if isinstance(module, nn.ReLU):
        slope = (h > 0).to(h.dtype)
    else:
        slope = torch.where(h > 0, 1.0, module.negative_slope).to(h.dtype)
    out = module(h)
    t.view((d,) + tuple(h.shape)).mul_(slope)
    return out, t


def _jacobian_by_tangents(cvae, z, cond, fc, conv):
    b, d = z.shape
    c = cvae.condition(cond, b)
    first = fc[0]
    h = first(torch.cat([z, c], 1))
    # The first layer's tangent along e_i is its weight's column i, the same for every sample: [d, B, out].
    # (a fresh copy: the pass updates its tangents in place, which must never reach the weight)
    t = first.weight[:, :d].t().unsqueeze(1).expand(d, b, first.out_features).clone(
        memory_format=torch.contiguous_format).view(d * b, first.out_features)
    for module in fc[1:]:
        h, t = _tangent_step(module, h, t, d)
    grid = (b,) + tuple(cvae._grid)
    h, t = h.reshape(grid), t.reshape((d * b,) + tuple(cvae._grid))
    if conv and h.dim() == 4:
        h = h.contiguous(memory_format=torch.channels_last)   # faster convolutions on CPU and CUDA
        t = t.contiguous(memory_format=torch.channels_last)
    for module in conv:
        h, t = _tangent_step(module, h, t, d)
    t = t.reshape((d, b, -1))
    g = h.reshape(b, -1)
    if cvae.output == "tanh":
        g = torch.tanh(g)
        t = t.mul_(1 - g * g) if t.is_contiguous() else t * (1 - g * g)
    return t.permute(1, 2, 0).contiguous(), g.contiguous()


#: Presets of the type-I step size beta, as ``(low, high, random_sign)`` on a data range of width 1 ([0, 1] images);
#: :class:`ManifoldSampler` scales them by the width of its ``bounds`` (x2 on [-1, 1]).
#: - ``"paper"``: beta ~ U[0.1, 1] (Vernekar et al. 2019, Sec. 3.1, for images in [0, 1]).
#: - ``"authors"`` (the default): beta ~ U(0.1, 28) with a random sign, as the authors' MNIST 0-9 notebook
#:   (sverneka/OODGen, ``mnist_0_9/cvae_generic_batchwise_mahalanobis.ipynb``, ``generate_ood_points``: images in
#:   [0, 1], ``np.random.uniform(0.1, 28.0)`` times ``np.random.choice([-1, 1])``). Their MNIST 0-4 notebook ran
#:   U(0.05, 1) with a random sign instead.
BETA_PRESETS = {"paper": (0.1, 1.0, False), "authors": (0.1, 28.0, True)}


#: How :meth:`ManifoldSampler.type2_latents` maps the unit sphere into a class's latent Gaussian:
#: - ``"authors"`` (the default since issue 19): the factor the notebooks compute (:func:`authors_ellipsoid_factor`),
#:   which is not a Cholesky factor; it is what produced the paper's tables. Measured (docs/fidelity.md,
#:   ManifoldSampler): Vernekar et al.'s Table 1, ID Fashion-MNIST vs MNIST, 68.2 -> 91.2 (paper 98.7); fine-tuning a
#:   SmallCNN on Fashion-MNIST (3 seeds) mean AUROC 82.7 -> 90.0, MNIST 33.9 -> 61.1, ID accuracy unchanged.
#: - ``"cholesky"`` (the text: points on the ``coverage`` ellipsoid): ``z = m + rho L u``, ``L L^T = Sigma``.
ELLIPSOIDS = ("cholesky", "authors")


def authors_ellipsoid_factor(cov: torch.Tensor) -> torch.Tensor:
    """The matrix ``C`` [d, d] that Vernekar et al.'s notebooks multiply the sphere by (sverneka/OODGen, every
    ``*/cvae_generic_batchwise_mahalanobis.ipynb``, ``generate_nd_hyperellipsoid_data``), from ``cov`` [d, d].

    Their loop is a Cholesky decomposition whose correction term ``s1 += C[i, j] * C[j, k]`` reads ``C[i, j]``, the
    entry being computed (still 0), instead of ``C[i, k]``; so ``s1 = 0`` and, for ``j <= i``,
    ``C[i, j] = Sigma[i, j] / sqrt(|Sigma[j, j] - sum_{k<j} C[j, k]^2|)`` (0 above the diagonal). For a diagonal
    ``Sigma`` it equals the Cholesky factor; with correlated latents ``C C^T != Sigma`` and the decoded points are
    far outside the ellipsoid (measured on a Fashion-MNIST CVAE: docs/fidelity.md, ManifoldSampler). float64.
    """
    cov = cov.double()
    d = cov.shape[0]
    factor = torch.zeros_like(cov)
    for j in range(d):
        denominator = (cov[j, j] - factor[j, :j].square().sum()).abs().sqrt()
        factor[j:, j] = cov[j:, j] / denominator
    if not bool(torch.isfinite(factor).all()):
        raise ValueError("authors_ellipsoid_factor: a zero pivot (|Sigma[j, j] - sum C[j, k]^2| = 0) gives a "
                         "non-finite factor; use ellipsoid='cholesky'")
    return factor


def bounds_width(lower, upper) -> float:
    """The width ``upper - lower`` of the data range, averaged over channels (per-channel bounds)."""
    k = max(len(lower), len(upper))
    lo, hi = lower * (k // len(lower)), upper * (k // len(upper))
    return sum(b - a for a, b in zip(lo, hi)) / k


def _check_number_pair(value, name, low_ok=0.0):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and low_ok <= lo <= hi):
        raise ValueError(f"{name} must satisfy {low_ok} <= low <= high (finite), got {value!r}")
    return lo, hi


class ManifoldSampler(metaclass=RecordsHyperparameters):
    """Type-I and type-II outliers of a trained conditional VAE (Vernekar et al. 2019).

    - :meth:`fit` (once, on ID training data): per class c, the mean ``m_c`` and covariance ``Sigma_c`` of the
      encoder means ``mu(x, c)``, ``L_c`` with ``L_c L_c^T = Sigma_c``, and the Mahalanobis radius ``r_c`` below which
      a fraction ``coverage`` of the class's encoder means lie (``|L_c^-1 (mu - m_c)| <= r_c``).
    - :meth:`type1` (off-manifold): ``z = mu(x, y)``; ``J = dg/dz`` at z (:func:`decoder_jacobian`, forward mode);
      ``v = P r / |P r|``, ``P = I - J (J^T J)^-1 J^T``, ``r ~ N(0, I_D)`` (:func:`fastood.ops.nullspace_project`);
      ``x~ = clip(x + beta v, bounds)``, ``beta ~ U(beta_range)``.
    - :meth:`type2` (class boundary, on-manifold): ``z = m_c + rho L_c u``, u uniform on the unit sphere,
      ``rho = r_c * U(1, shell)`` (default shell 1.5; ``shell=None``: ``rho = r_c``), decoded as ``g(z, c)``.
      With ``ellipsoid="cholesky"`` and ``shell=None`` (the text) ``z`` is on the surface of class c's
      ``coverage`` ellipsoid (the affine image of the uniform sphere: uniform in the sphere's parameterization);
      with ``ellipsoid="authors"`` (the default) the notebooks' matrix (:func:`authors_ellipsoid_factor`) replaces
      ``L_c`` and z lies beyond the ellipsoid.
    - :meth:`sample` (sampler protocol): type I from the current ID batch for a ``type1_fraction`` of the samples,
      type II for the rest.

    The CVAE is in eval mode with ``requires_grad`` off while sampling; both are restored afterwards. Random
    numbers come from torch's default generator of the CVAE's device (``torch.manual_seed`` reproduces them).

    Args:
        cvae: a trained :class:`fastood.models.ConditionalVAE` (or a model with ``encode``, ``decode``,
            ``latent_dim``, ``num_classes``, ``image_shape``).
        beta_range: the type-I step size beta (the L2 norm of ``x~ - x`` before clipping): ``"authors"``
            (default: U(0.1, 28) of a [0, 1] range with a random sign, the authors' MNIST 0-9 notebooks, which
            produced the paper's tables; U(0.2, 56) on [-1, 1]; see :data:`BETA_PRESETS`), ``"paper"`` (the text's
            U[0.1, 1] of a [0, 1] range, i.e. U[0.1, 1] * (upper - lower) of ``bounds``: U[0.2, 2] on [-1, 1]), or
            ``(low, high)`` in image units, 0 <= low <= high. Measured on full Fashion-MNIST (docs/fidelity.md,
            ManifoldSampler): with the text's range the type-I outliers moved 8.8% of the distance between
            neighbouring ID images, and the n+1 classifier ranked Gaussian / uniform / sphere noise as *more* ID
            than the test images (the paper's own networks: AUROC 17 / 11 / 1, the authors' range 100 / 100 / 100;
            fine-tuning fastood's SmallCNN from a pretrained one, seed 0: the text's range collapsed the eval-mode
            ID accuracy to 25.7% with mean AUROC 76.7, the authors' kept 89.5% with 83.1). On mnist5k-0to4 (3
            seeds, bench/quality_cvae.py): "paper" 91.6, "authors" 93.6.
        random_sign: multiply beta by a random sign (default: the preset's; False for a pair). ``v`` is already
            symmetric in distribution, so this only matches the authors' code; it changes no distribution.
        coverage: fraction of each class's latent means inside its ellipsoid (paper: 0.95), in (0, 1].
        shell: a factor >= 1, radii drawn from ``r_c * U(1, shell)`` (default 1.5, the authors' notebooks:
            ``generate_nd_hyperellipsoid_data`` draws U(r, 1.5 r)); 1 or None: the text's radius ``r_c`` (pass 1
            through :class:`~fastood.trainers.ManifoldTrainer`, where None means "the sampler's default"). With the
            authors' factor too (both defaults), fine-tuning a SmallCNN on Fashion-MNIST (3 seeds, docs/fidelity.md)
            reached mean AUROC 92.2, against 90.0 with ``shell=None`` and 82.7 with the text's draw.
        ellipsoid: ``"authors"`` (default: the notebooks' factor, :func:`authors_ellipsoid_factor`, which produced
            the paper's tables: with correlated latents it puts z far beyond ``r_c``, and ``stats["radius"]`` then
            holds the Mahalanobis radius z really has) or ``"cholesky"`` (the text: z on the ellipsoid). See
            :data:`ELLIPSOIDS` for the measurements behind the default.
        bounds: ``(lower, upper)`` data range (scalars or per-channel); outliers are clipped into it.
        type1_fraction: fraction of :meth:`sample`'s outliers that are type I when an ID batch is given, in [0, 1].
        anchor: ``"input"`` (paper: ``x~ = x + beta v``) or ``"reconstruction"`` (``x~ = g(mu) + beta v``, the
            decoded point at which J is taken; it comes free with the Jacobian).
        batch_size: the most images encoded/decoded at once (bounds the Jacobian's memory: batch_size * D * d).
    """

    #: How :meth:`type1` takes the decoder Jacobian (:func:`decoder_jacobian`'s ``method``): "auto", "tangents" or
    #: "func" -- the same Jacobian to float rounding; a class attribute (not a hyperparameter) benches may override.
    jacobian_method = "auto"

    def __init__(self, cvae: nn.Module, beta_range="authors", coverage=0.95, shell=1.5, bounds=(-1.0, 1.0),
                 type1_fraction=0.5, anchor="input", batch_size=256, random_sign=None, ellipsoid="authors"):
        check_cvae(cvae, ("encode", "decode", "latent_dim", "num_classes", "image_shape"))
        self.cvae = cvae
        self.lower, self.upper = check_bounds(bounds)
        if isinstance(beta_range, str):
            if beta_range not in BETA_PRESETS:
                raise ValueError(f"beta_range must be one of {sorted(BETA_PRESETS)} or a pair (low, high), "
                                 f"got {beta_range!r}")
            low, high, preset_sign = BETA_PRESETS[beta_range]
            width = bounds_width(self.lower, self.upper)  # the presets are stated for a [0, 1] range
            self.beta_preset, self.beta_range = beta_range, (low * width, high * width)
        else:
            self.beta_preset, preset_sign = None, False
            self.beta_range = _check_number_pair(beta_range, "beta_range")
        if random_sign is not None and not isinstance(random_sign, bool):
            raise TypeError(f"random_sign must be None or a bool, got {random_sign!r}")
        self.random_sign = preset_sign if random_sign is None else random_sign
        coverage = float(coverage)
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        self.coverage = coverage
        if shell is not None:
            shell = float(shell)
            if not (math.isfinite(shell) and shell >= 1.0):
                raise ValueError(f"shell must be None or a finite factor >= 1, got {shell}")
        self.shell = shell
        if ellipsoid not in ELLIPSOIDS:
            raise ValueError(f"ellipsoid must be one of {ELLIPSOIDS}, got {ellipsoid!r}")
        self.ellipsoid = ellipsoid
        self._authors_factors = (None, None)   # (the chols they were computed from, factors [n_cls, d, d])
        check_shape(cvae.image_shape, (self.lower, self.upper))
        type1_fraction = float(type1_fraction)
        if not 0.0 <= type1_fraction <= 1.0:
            raise ValueError(f"type1_fraction must be in [0, 1], got {type1_fraction}")
        self.type1_fraction = type1_fraction
        if anchor not in ("input", "reconstruction"):
            raise ValueError(f"anchor must be 'input' or 'reconstruction', got {anchor!r}")
        self.anchor = anchor
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.means = self.chols = self.radii = self.counts = None
        self._last_radius = torch.zeros(0, dtype=torch.float64)
        self.stats = {}

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return model_device(self.cvae)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.cvae)

    @property
    def fitted(self) -> bool:
        return self.means is not None

    @property
    def fitted_classes(self) -> torch.Tensor:
        """Indices of the classes :meth:`fit` saw at least two encoder means of (long tensor, CPU)."""
        self._require_fit()
        return torch.nonzero(self.counts >= 2).flatten()

    def _require_fit(self):
        if not self.fitted:
            raise RuntimeError("ManifoldSampler: call fit(loader) on ID training data before drawing type-II "
                               "outliers (the class ellipsoids are needed)")

    def _clip(self, x):
        if len(self.lower) == 1 and len(self.upper) == 1:   # one pass for scalar bounds
            return torch.clamp(x, self.lower[0], self.upper[0])
        lo = bound_tensor(self.lower, x.dim(), x.device, x.dtype)
        hi = bound_tensor(self.upper, x.dim(), x.device, x.dtype)
        return torch.maximum(torch.minimum(x, hi), lo)

    def _labels(self, y, n, name="y"):
        if isinstance(y, bool):
            raise TypeError(f"{name} must be an int or an integer tensor [{n}], got bool")
        if isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long)
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"{name} must be an int or an integer tensor [{n}], got {got}")
        if y.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(y.shape)}")
        y = y.to(self.device, torch.long)
        if n and (int(y.min()) < 0 or int(y.max()) >= self.cvae.num_classes):
            raise ValueError(f"{name} must hold classes in [0, {self.cvae.num_classes - 1}], got values in "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "ManifoldSampler":
        """Fit the class ellipsoids to the encoder means of ``loader``'s labeled ID batches ``(x, y)``.

        Per class: mean, covariance (unbiased, plus a ridge of 1e-6 * its mean variance so that fewer samples
        than latent dimensions still give a positive definite matrix), Cholesky factor and the ``coverage``
        quantile of the Mahalanobis distances (linear interpolation, ``torch.quantile``). Classes with fewer than
        two samples are left out (type II cannot be drawn for them). Returns ``self``.
        """
        from tqdm.auto import tqdm

        d, n_cls = self.cvae.latent_dim, self.cvae.num_classes
        latents, labels = [], []
        with frozen(self.cvae):
            for batch in tqdm(loader, desc="ManifoldSampler.fit", disable=not progress, leave=False):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("ManifoldSampler.fit needs labeled batches (x, y)")
                x = batch[0].to(self.device, self.dtype)
                y = self._labels(torch.as_tensor(batch[1]), x.shape[0])
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("ManifoldSampler.fit: the loader yielded NaN/Inf images")
                latents.append(self.cvae.encode(x, y)[0].double().cpu())
                labels.append(y.cpu())
        if not latents or sum(len(y) for y in labels) == 0:
            raise ValueError("ManifoldSampler.fit: the loader yielded no images")
        mu, y = torch.cat(latents), torch.cat(labels)
        means = torch.zeros(n_cls, d, dtype=torch.float64)
        chols = torch.eye(d, dtype=torch.float64).repeat(n_cls, 1, 1)
        radii = torch.zeros(n_cls, dtype=torch.float64)
        counts = torch.bincount(y, minlength=n_cls)
        if int(counts.max()) < 2:
            raise ValueError("ManifoldSampler.fit needs at least two images of some class, got at most one per class")
        for c in torch.nonzero(counts >= 2).flatten().tolist():
            points = mu[y == c]
            mean = points.mean(0)
            centered = points - mean
            cov = centered.T @ centered / (points.shape[0] - 1)
            cov = cov + (1e-6 * cov.diagonal().mean() + 1e-12) * torch.eye(d, dtype=cov.dtype)
            chol = torch.linalg.cholesky(cov)
            dist = torch.linalg.solve_triangular(chol, centered.T, upper=False).norm(dim=0)
            means[c], chols[c], radii[c] = mean, chol, torch.quantile(dist, self.coverage)
        self.means, self.chols, self.radii, self.counts = means, chols, radii, counts
        return self

    def mahalanobis(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``|L_y^-1 (z - m_y)|`` [B] (float64, CPU) of latents z [B, d] under their classes' Gaussians."""
        self._require_fit()
        y = self._labels(y, z.shape[0]).cpu()
        diff = (z.detach().double().cpu() - self.means[y]).unsqueeze(2)
        return torch.linalg.solve_triangular(self.chols[y], diff, upper=False).squeeze(2).norm(dim=1)

    def state_dict(self) -> dict:
        return {"means": self.means, "chols": self.chols, "radii": self.radii, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        # on the CPU, where fit keeps them (a checkpoint loaded with map_location="cuda" brings them to the GPU)
        self.means, self.chols, self.radii, self.counts = (
            state[k].cpu() if isinstance(state[k], torch.Tensor) else state[k]
            for k in ("means", "chols", "radii", "counts"))

    # ------------------------------------------------------------------ type I
    def _check_images(self, x, name="x"):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating-point image tensor, got {got}")
        shape = tuple(self.cvae.image_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}] (the CVAE's images), "
                             f"got {tuple(x.shape)}")
        # a finite sum proves every value finite (one reduction instead of isfinite's four passes); only a
        # non-finite sum (a NaN/Inf, or an overflow of huge finite values) needs the full test
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN/Inf")
        return x

    def type1(self, x: torch.Tensor, y) -> torch.Tensor:
        """Off-manifold outliers of an ID batch: ``clip(x + beta v)`` [B, C, H, W], on x's device and dtype.

        Args:
            x: ID images [B, C, H, W] in the data range; y: their labels (int tensor [B] or an int).
        ``stats`` gets ``beta`` [B] (signed with ``random_sign``), ``step`` [B] (``|x~ - x|_2`` after clipping: the
        distance an outlier actually moved), ``labels`` [B] and ``jacobian_norm`` [B] (Frobenius norm of each J).
        """
        x = self._check_images(x)
        y = self._labels(y, x.shape[0])
        out = torch.empty_like(x)
        betas, norms, steps = [], [], []
        with frozen(self.cvae), torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                xb = x[start:start + self.batch_size].to(self.device, self.dtype)
                yb = y[start:start + self.batch_size]
                cond = self.cvae.class_vectors(yb) if hasattr(self.cvae, "class_vectors") else yb
                mu = self.cvae.encode(xb, cond)[0]
                jac, recon = decoder_jacobian(self.cvae, mu, cond, method=self.jacobian_method)
                v = ops.nullspace_project(jac, torch.randn_like(recon))
                lo, hi = self.beta_range
                beta = lo + (hi - lo) * torch.rand(xb.shape[0], 1, device=xb.device, dtype=xb.dtype)
                if self.random_sign:
                    beta = beta * (torch.randint(2, beta.shape, device=xb.device).to(xb.dtype) * 2 - 1)
                base = xb.flatten(1) if self.anchor == "input" else recon
                moved = self._clip((base + beta * v).view_as(xb))
                out[start:start + self.batch_size] = moved.to(x.device, x.dtype)
                betas.append(beta.squeeze(1))
                steps.append((moved - xb).flatten(1).norm(dim=1))
                norms.append(jac.flatten(1).norm(dim=1))
        empty = x.new_zeros(0)
        self.stats = {"type1": x.shape[0], "type2": 0, "labels": y,
                      "beta": torch.cat(betas) if betas else empty,
                      "step": torch.cat(steps) if steps else empty,
                      "jacobian_norm": torch.cat(norms) if norms else empty}
        return out

    # ------------------------------------------------------------------ type II
    def type2_latents(self, n: int, y=None):
        """``(z [n, d], y [n])``: points on the class ellipsoids' surfaces (or shells), see the class docstring.

        ``y``: None (classes drawn uniformly from :attr:`fitted_classes`), an int, or an int tensor [n].
        """
        self._require_fit()
        n = check_count(n)
        fitted = self.fitted_classes
        if y is None:
            y = fitted[torch.randint(len(fitted), (n,), device=self.device).cpu()].to(self.device)
        y = self._labels(y, n)
        missing = sorted(set(y.unique().tolist()) - set(fitted.tolist()))
        if missing:
            raise ValueError(f"type-II outliers requested for class(es) {missing} that fit() saw fewer than two "
                             f"images of; fitted classes: {fitted.tolist()}")
        d = self.cvae.latent_dim
        u = torch.randn(n, d, device=self.device, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        radius = self.radii.to(self.device)[y]
        if self.shell is not None:
            radius = radius * (1.0 + (self.shell - 1.0) * torch.rand(n, device=self.device, dtype=torch.float64))
        factors = self.chols if self.ellipsoid == "cholesky" else self._authors_factor_table()
        chol, mean = factors.to(self.device)[y], self.means.to(self.device)[y]
        z = mean + radius.unsqueeze(1) * (chol @ u.unsqueeze(2)).squeeze(2)
        self._last_radius = radius.detach().cpu() if self.ellipsoid == "cholesky" else self.mahalanobis(z, y)
        return z.to(self.dtype), y

    def _authors_factor_table(self) -> torch.Tensor:
        """:func:`authors_ellipsoid_factor` of every class's covariance ``L_c L_c^T`` [n_cls, d, d] (cached)."""
        source, table = self._authors_factors
        if source is not self.chols:
            table = torch.stack([authors_ellipsoid_factor(chol @ chol.T) for chol in self.chols])
            self._authors_factors = (self.chols, table)
        return table

    def type2(self, n: int, y=None) -> torch.Tensor:
        """``n`` class-boundary outliers ``g(z, y)`` [n, C, H, W] on the CVAE's device, clipped into ``bounds``.

        ``y``: None (uniform over the fitted classes), an int or an int tensor [n]. ``stats`` gets ``labels`` [n],
        ``latents`` [n, d] and ``radius`` [n] (the Mahalanobis radius of each latent under its class's Gaussian:
        ``r_c``, or ``r_c`` times the shell factor; with ``ellipsoid="authors"`` computed from z).
        """
        z, y = self.type2_latents(n, y)
        out = torch.empty((z.shape[0],) + tuple(self.cvae.image_shape), device=self.device, dtype=self.dtype)
        with frozen(self.cvae), torch.no_grad():
            for start in range(0, z.shape[0], self.batch_size):
                sl = slice(start, start + self.batch_size)
                out[sl] = self._clip(self.cvae.decode(z[sl], y[sl]))
        self.stats = {"type1": 0, "type2": z.shape[0], "labels": y, "latents": z, "radius": self._last_radius}
        return out

    # ------------------------------------------------------------------ protocol
    def sample(self, model, n, shape=None, context=None) -> torch.Tensor:
        """Sampler protocol: ``n`` outliers [n, C, H, W] (detached).

        With ``context = (x, y)`` (the current ID batch), ``round(type1_fraction * n)`` are type I from images of
        that batch (drawn without replacement when the batch is large enough, else with replacement), the rest
        type II (classes uniform over the fitted ones); without context, all are type II. Type I come first.
        Returned on x's device when a context is given, else on the CVAE's device. ``model`` is ignored;
        ``shape`` must be None or the CVAE's image shape.

        ``stats``: ``type1``, ``type2`` (counts), ``labels`` [n] (the class each outlier came from), ``beta`` and
        ``step`` [type1], ``radius`` [type2] (see :meth:`type1`, :meth:`type2`).
        """
        n = check_count(n)
        if shape is not None and tuple(check_shape(shape)) != tuple(self.cvae.image_shape):
            raise ValueError(f"shape {tuple(shape)} does not match the CVAE's image shape "
                             f"{tuple(self.cvae.image_shape)}")
        n1, parts, labels, beta, step, radius = 0, [], [], None, None, None
        out_device = self.device
        if context is not None:
            if not isinstance(context, (tuple, list)) or len(context) < 2:
                raise ValueError("context must be the ID batch (x, y) with labels (type I needs them)")
            x, y = context[0], context[1]
            x = self._check_images(x, "context x")
            out_device = x.device
            if x.shape[0] > 0:
                n1 = int(round(self.type1_fraction * n))
                if n1 <= x.shape[0]:
                    idx = torch.randperm(x.shape[0], device=self.device)[:n1]
                else:
                    idx = torch.randint(x.shape[0], (n1,), device=self.device)
                idx = idx.to(x.device)
                y = torch.as_tensor(y, device=x.device)
                parts.append(self.type1(x[idx], y[idx]).to(out_device))
                labels.append(self.stats["labels"])
                beta, step = self.stats["beta"], self.stats["step"]
        if n - n1 > 0:
            parts.append(self.type2(n - n1).to(out_device))
            labels.append(self.stats["labels"])
            radius = self.stats["radius"]
        if not parts:
            self.stats = {"type1": 0, "type2": 0, "labels": torch.zeros(0, dtype=torch.long)}
            return torch.zeros((0,) + tuple(self.cvae.image_shape), device=out_device, dtype=self.dtype)
        self.stats = {"type1": n1, "type2": n - n1, "labels": torch.cat([t.to(out_device) for t in labels]),
                      "beta": beta if beta is not None else torch.zeros(0),
                      "step": step if step is not None else torch.zeros(0),
                      "radius": radius if radius is not None else torch.zeros(0)}
        return torch.cat(parts).detach()
