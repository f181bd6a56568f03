"""ManifoldSampler (forward-mode Jacobian, type I in the null space, type II on the 95% ellipsoid) and
ManifoldTrainer (the n+1 classifier)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import ExtraClass, MaxIDProbability
from fastood.models import SmallCNN
from fastood.models.cvae import ConditionalVAE
from fastood.samplers.manifold import ManifoldSampler, decoder_jacobian
from fastood.trainers import MechanismIdleWarning
from fastood.trainers.manifold import ManifoldTrainer, grow_head
from toy_images import stripes


def tiny_cvae(num_classes=3, latent_dim=4, image_size=28):
    torch.manual_seed(0)
    return ConditionalVAE(1, image_size, num_classes, latent_dim, width=4, hidden=16)


def labeled(n=60, num_classes=3, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 1.6 - 0.8
    y = torch.arange(n) % num_classes
    return x, y


def loader(n=60, batch_size=12, shuffle=False):
    return DataLoader(TensorDataset(*labeled(n)), batch_size=batch_size, shuffle=shuffle)


def autograd_jacobian(cvae, z, y):
    """Per-sample Jacobians by reverse mode (torch.autograd.functional.jacobian), [B, D, d]."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda zz: cvae.decode(zz.unsqueeze(0), y[i:i + 1]).flatten(), z[i])
        for i in range(z.shape[0])])


def test_forward_mode_jacobian_equals_autograd():
    cvae = tiny_cvae(image_size=8)  # D = 64: the reverse-mode reference needs D backward passes per sample
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    jac, images = decoder_jacobian(cvae, z, y)
    assert jac.shape == (5, 64, 4)
    torch.testing.assert_close(jac, autograd_jacobian(cvae, z, y), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(images, cvae.decode(z, y).flatten(1))
    chunked, _ = decoder_jacobian(cvae, z, y, chunk_size=3)
    torch.testing.assert_close(chunked, jac)


def test_type1_lies_in_the_left_null_space():
    cvae = tiny_cvae(image_size=8)
    sampler = ManifoldSampler(cvae, bounds=(-100.0, 100.0), beta_range=(0.1, 1.0))  # wide box: nothing clipped
    x, y = labeled(8, size=8)
    out = sampler.type1(x, y)
    beta = sampler.stats["beta"]
    assert out.shape == x.shape and ((beta >= 0.1) & (beta <= 1.0)).all()
    v = (out - x).flatten(1) / beta[:, None]
    torch.testing.assert_close(v.norm(dim=1), torch.ones(8), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        mu = cvae.encode(x, y)[0]
    jac = autograd_jacobian(cvae, mu, y)
    # |J^T v| is ~1e-7 of |J| (float32), while a random unit vector gives ~|J| sqrt(d / D)
    residual = (jac.transpose(1, 2) @ v.unsqueeze(2)).squeeze(2).norm(dim=1)
    assert (residual / jac.flatten(1).norm(dim=1)).max() < 1e-4
    random_dir = F.normalize(torch.randn(8, 64), dim=1)
    assert ((jac.transpose(1, 2) @ random_dir.unsqueeze(2)).squeeze(2).norm(dim=1)
            / jac.flatten(1).norm(dim=1)).min() > 1e-2


def test_type1_stays_in_the_data_range_and_restores_the_cvae():
    cvae = tiny_cvae()
    cvae.train()
    sampler = ManifoldSampler(cvae, beta_range=(5.0, 5.0))
    x = torch.where(torch.rand(6, 1, 28, 28) > 0.5, 1.0, -1.0)  # on the faces of the box
    out = sampler.type1(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.min() >= -1 and out.max() <= 1 and not torch.equal(out, x)
    assert torch.equal(sampler.stats["beta"], torch.full((6,), 5.0))
    assert cvae.training and all(p.requires_grad for p in cvae.parameters())
    assert all(p.grad is None for p in cvae.parameters())
    lo, hi = ManifoldSampler(cvae, bounds=(-0.5, 0.25)).type1(x, 1).aminmax()
    assert lo >= -0.5 and hi <= 0.25


def test_reconstruction_anchor_starts_from_the_decoded_mean():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, bounds=(-100.0, 100.0), anchor="reconstruction", beta_range=(0.0, 0.0))
    x, y = labeled(4)
    with torch.no_grad():
        expected = cvae.decode(cvae.encode(x, y)[0], y)
    torch.testing.assert_close(sampler.type1(x, y), expected)


def test_fit_ellipsoids_and_type2_on_the_surface():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, shell=None, ellipsoid="cholesky").fit(loader())  # the text's draw: on it
    x, y = labeled(60)
    with torch.no_grad():
        mu = cvae.encode(x, y)[0].double()
    for c in range(3):
        points = mu[y == c]
        torch.testing.assert_close(sampler.means[c], points.mean(0))
        cov = torch.cov(points.T)
        torch.testing.assert_close(sampler.chols[c] @ sampler.chols[c].T, cov, rtol=1e-4, atol=1e-6 * cov.trace())
        # the radius holds 95% of the class's encoder means
        dist = sampler.mahalanobis(points.float(), torch.full((20,), c))
        inside = (dist <= sampler.radii[c] + 1e-9).double().mean()
        assert 0.95 <= inside < 1.0
    out = sampler.type2(30)
    assert out.shape == (30, 1, 28, 28) and out.min() >= -1 and out.max() <= 1
    z, labels = sampler.stats["latents"], sampler.stats["labels"]
    torch.testing.assert_close(sampler.mahalanobis(z, labels), sampler.radii[labels.cpu()], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out, cvae.decode(z, labels))
    assert set(labels.tolist()) == {0, 1, 2}


def test_type2_shell_and_requested_classes():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, shell=1.5, ellipsoid="cholesky").fit(loader())
    sampler.type2(200, torch.full((200,), 1))
    ratio = sampler.mahalanobis(sampler.stats["latents"], sampler.stats["labels"]) / sampler.radii[1]
    assert ratio.min() >= 1 - 1e-6 and ratio.max() <= 1.5 + 1e-6 and ratio.std() > 0.1
    assert (sampler.stats["labels"] == 1).all()


def _notebook_factor(cov):
    """The notebooks' generate_nd_hyperellipsoid_data loop, transcribed as written (s1 reads C[i, j])."""
    import numpy as np
    cov = cov.numpy()
    C = np.zeros_like(cov)
    for i in range(C.shape[0]):
        for j in range(i + 1):
            s1 = 0
            for k in range(j):
                s1 += C[i, j] * C[j, k]
            s2 = 0
            for k in range(j):
                s2 += C[j, k] * C[j, k]
            C[i, j] = (cov[i, j] - s1) / np.sqrt(np.abs(cov[j, j] - s2))
    return torch.from_numpy(C)


def test_authors_ellipsoid_factor_is_the_notebooks_loop():
    from fastood.samplers.manifold import authors_ellipsoid_factor

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(authors_ellipsoid_factor(cov), _notebook_factor(cov))
    # not a Cholesky factor for correlated latents; the Cholesky factor for a diagonal covariance
    assert not torch.allclose(authors_ellipsoid_factor(cov) @ authors_ellipsoid_factor(cov).T, cov, atol=1e-3)
    diag = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(authors_ellipsoid_factor(diag), torch.linalg.cholesky(diag))
    with pytest.raises(ValueError, match="zero pivot"):
        authors_ellipsoid_factor(torch.zeros(2, 2))


def test_type2_with_the_authors_factor_reports_the_real_radius():
    cvae = tiny_cvae()
    # the defaults: the notebooks' draw, which produced the paper's tables
    assert ManifoldSampler(cvae).ellipsoid == "authors" and ManifoldSampler(cvae).shell == 1.5
    sampler = ManifoldSampler(cvae, shell=1.0).fit(loader())  # radius exactly r: shell 1 is the text's radius
    sampler.type2(50, torch.full((50,), 2))
    z, labels = sampler.stats["latents"], sampler.stats["labels"]
    chol = sampler.chols[2]
    factor = _notebook_factor(chol @ chol.T)
    # z = m + r C u: (z - m) / r lies on the image of the unit sphere under the notebooks' C
    u = torch.linalg.solve_triangular(factor, ((z.double().cpu() - sampler.means[2]) / sampler.radii[2]).T,
                                      upper=False).T
    torch.testing.assert_close(u.norm(dim=1), torch.ones(50, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sampler.stats["radius"], sampler.mahalanobis(z, labels), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ellipsoid must be one of"):
        ManifoldSampler(cvae, ellipsoid="sphere")


def test_fit_leaves_out_classes_without_data():
    cvae = tiny_cvae(num_classes=4)
    sampler = ManifoldSampler(cvae).fit(loader())  # labels 0..2 only
    assert sampler.fitted_classes.tolist() == [0, 1, 2]
    sampler.type2(10)
    assert sampler.stats["labels"].max() <= 2
    with pytest.raises(ValueError, match=r"class\(es\) \[3\]"):
        sampler.type2(2, 3)


def test_sample_protocol_mixes_type1_and_type2():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, type1_fraction=0.25).fit(loader())
    x, y = labeled(6)
    out = sampler.sample(None, 8, (1, 28, 28), context=(x, y))
    assert out.shape == (8, 1, 28, 28) and not out.requires_grad
    assert sampler.stats["type1"] == 2 and sampler.stats["type2"] == 6 and len(sampler.stats["labels"]) == 8
    out = sampler.sample(nn.Linear(1, 1), 5, (1, 28, 28))
    assert out.shape == (5, 1, 28, 28) and sampler.stats["type1"] == 0
    # more type I than images in the batch: drawn with replacement
    sampler = ManifoldSampler(cvae, type1_fraction=1.0)
    assert sampler.sample(None, 10, None, context=(x, y)).shape == (10, 1, 28, 28)
    assert sampler.sample(None, 0, (1, 28, 28)).shape == (0, 1, 28, 28)


def test_sampler_errors():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae)
    with pytest.raises(RuntimeError, match="call fit"):
        sampler.type2(3)
    with pytest.raises(ValueError, match="does not match the CVAE's image shape"):
        sampler.sample(None, 2, (3, 32, 32), context=labeled(2))
    with pytest.raises(ValueError, match="contains NaN/Inf"):
        sampler.type1(torch.full((2, 1, 28, 28), float("nan")), 0)
    with pytest.raises(ValueError, match=r"must have shape \[B, 1, 28, 28\]"):
        sampler.type1(torch.zeros(2, 28, 28), 0)
    with pytest.raises(ValueError, match=r"y must hold classes in \[0, 2\]"):
        sampler.type1(torch.zeros(2, 1, 28, 28), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labeled batches"):
        sampler.fit([torch.zeros(2, 1, 28, 28)])
    with pytest.raises(ValueError, match="beta_range"):
        ManifoldSampler(cvae, beta_range=(1.0, 0.1))
    with pytest.raises(ValueError, match="coverage"):
        ManifoldSampler(cvae, coverage=0.0)
    with pytest.raises(ValueError, match="shell"):
        ManifoldSampler(cvae, shell=0.5)
    with pytest.raises(TypeError, match="must provide 'encode'"):
        ManifoldSampler(nn.Linear(2, 2))
    assert sampler.type1(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)).shape == (0, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------- trainer
def tiny_classifier(num_classes):
    torch.manual_seed(1)
    return SmallCNN(1, num_classes, 28, width=4, feat_dim=8)


class FixedOutliers:
    """A deterministic stand-in for the manifold sampler: type I = -x, type II = zeros."""

    def type1(self, x, y):
        return -x

    def type2(self, n, y=None):
        return torch.zeros(n, 1, 28, 28)

    def sample(self, model, n, shape, context=None):
        raise AssertionError("the trainer draws typed outliers when the sampler offers them")


def test_weighted_loss_matches_hand_computation():
    model = tiny_classifier(4)
    before = copy.deepcopy(model)
    trainer = ManifoldTrainer(model, FixedOutliers(), ood_weight=0.1, ratio=(2, 1, 1), progress=False)
    x, y = labeled(8)
    torch.manual_seed(3)
    logs = trainer.training_step((x, y))
    torch.manual_seed(3)
    idx = torch.randperm(8)[:4]  # the ID images the trainer perturbs into type I
    before.train()
    logits = before(torch.cat([x, -x[idx], torch.zeros(4, 1, 28, 28)]))
    targets = torch.cat([y, torch.full((8,), 3)])
    w = torch.tensor([1.0, 1.0, 1.0, 0.1])[targets]
    per_sample = -torch.log_softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(logs["loss"], (w * per_sample).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    assert {"ce_id", "acc", "type1_rejected", "type2_rejected"} <= set(logs)


def test_trains_from_scratch_and_rejects_outliers():
    cvae = tiny_cvae()
    model = tiny_classifier(4)
    data = DataLoader(TensorDataset(*stripes(60)), batch_size=12, shuffle=True)
    trainer = ManifoldTrainer(model, cvae, progress=False, lr=0.05).fit(data, epochs=4)
    assert trainer.sampler.fitted  # fitted on the training loader when fit started
    assert len(trainer.history) == 20
    det = trainer.detector()
    assert isinstance(det, ExtraClass)
    x, y = stripes(30, seed=1)
    id_scores = det.score(x)
    outlier_scores = det.score(trainer.sampler.type2(30))
    assert id_scores.shape == (30,) and ((id_scores >= 0) & (id_scores <= 1)).all()
    assert outlier_scores.min() > id_scores.max()  # perfectly separated (AUROC 1)
    assert (det.predict_class(x) == y).float().mean() > 0.9


def test_extend_head_keeps_the_trained_rows():
    model = tiny_classifier(3)
    old = copy.deepcopy(model.fc)
    trainer = ManifoldTrainer(model, tiny_cvae(), extend_head=True, progress=False)
    assert model.fc.out_features == 4 and trainer.model is model
    torch.testing.assert_close(model.fc.weight[:3], old.weight)
    torch.testing.assert_close(model.fc.bias[:3], old.bias)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(784, 2))
    new = grow_head(seq, 2)
    assert seq[-1] is new and new.out_features == 4


def test_resume_restores_the_fitted_sampler(tmp_path):
    cvae = tiny_cvae()
    ManifoldTrainer(tiny_classifier(4), cvae, progress=False, checkpoint_dir=str(tmp_path)).fit(loader(), steps=2)
    fresh = ManifoldTrainer(tiny_classifier(4), cvae, progress=False, checkpoint_dir=str(tmp_path))
    assert fresh.resume() and fresh.sampler.fitted
    reference = ManifoldSampler(cvae).fit(loader())
    torch.testing.assert_close(fresh.sampler.radii, reference.radii)


def test_trainer_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        ManifoldTrainer(tiny_classifier(3), FixedOutliers(), progress=False).training_step(labeled(6))
    with pytest.raises(ValueError, match="ratio"):
        ManifoldTrainer(tiny_classifier(4), FixedOutliers(), ratio=(0, 1, 1))
    with pytest.raises(ValueError, match="ood_weight"):
        ManifoldTrainer(tiny_classifier(4), FixedOutliers(), ood_weight=0)
    with pytest.raises(TypeError, match="ConditionalVAE or a sampler"):
        ManifoldTrainer(tiny_classifier(4), object())


def test_trainer_passes_beta_range_to_its_default_sampler():
    trainer = ManifoldTrainer(tiny_classifier(4), tiny_cvae(), beta_range="authors", progress=False)
    assert trainer.sampler.beta_preset == "authors" and trainer.sampler.random_sign
    assert trainer.sampler.beta_range == pytest.approx((0.2, 56.0))  # U(0.1, 28) of the [-1, 1] range's width
    assert ManifoldTrainer(tiny_classifier(4), tiny_cvae(), progress=False).sampler.beta_preset == "authors"
    assert ManifoldTrainer(tiny_classifier(4), tiny_cvae(), beta_range="paper",
                           progress=False).sampler.beta_preset == "paper"
    assert ManifoldTrainer(tiny_classifier(4), tiny_cvae(), beta_range=(0.5, 1.5),
                           progress=False).sampler.beta_range == (0.5, 1.5)
    with pytest.raises(ValueError, match="beta_range is for the default sampler"):
        ManifoldTrainer(tiny_classifier(4), FixedOutliers(), beta_range="authors")


def test_trainer_passes_the_type2_options_to_its_default_sampler():
    plain = ManifoldTrainer(tiny_classifier(4), tiny_cvae(), progress=False).sampler
    assert plain.shell == 1.5 and plain.ellipsoid == "authors"  # the sampler's defaults: the notebooks' draw
    sampler = ManifoldTrainer(tiny_classifier(4), tiny_cvae(), shell=2.0, ellipsoid="cholesky", progress=False).sampler
    assert sampler.shell == 2.0 and sampler.ellipsoid == "cholesky"
    for name, value in (("shell", 1.5), ("ellipsoid", "authors")):
        with pytest.raises(ValueError, match=f"{name} is for the default sampler"):
            ManifoldTrainer(tiny_classifier(4), FixedOutliers(), **{name: value})


# ---------------------------------------------------------------------------------------------------- issue 12
def test_beta_default_is_the_authors_range_and_paper_the_texts_on_the_datas_scale():
    cvae = tiny_cvae()
    # The default: the authors' notebooks (which produced Table 1), U(0.1, 28) of a [0, 1] range, random sign.
    assert ManifoldSampler(cvae).beta_preset == "authors" and ManifoldSampler(cvae).random_sign
    assert ManifoldSampler(cvae).beta_range == pytest.approx((0.2, 56.0))
    # Vernekar et al. 2019, Sec. 3.1: beta ~ U[0.1, 1] for images in [0, 1]; on [-1, 1] that is U[0.2, 2].
    assert ManifoldSampler(cvae, beta_range="paper").beta_range == pytest.approx((0.2, 2.0))
    assert ManifoldSampler(cvae, beta_range="paper", bounds=(0.0, 1.0)).beta_range == pytest.approx((0.1, 1.0))
    assert not ManifoldSampler(cvae, beta_range="paper").random_sign
    # an explicit pair stays in image units
    assert ManifoldSampler(cvae, beta_range=(0.1, 1.0)).beta_range == (0.1, 1.0)
    with pytest.raises(ValueError, match="beta_range must be one of"):
        ManifoldSampler(cvae, beta_range="huge")


def test_authors_preset_draws_up_to_28_of_a_unit_range_with_a_random_sign():
    # sverneka/OODGen, mnist_0_9 notebook (images in [0, 1]): np.random.uniform(0.1, 28.0) * choice([-1, 1]).
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, beta_range="authors", bounds=(0.0, 1.0))
    assert sampler.beta_range == pytest.approx((0.1, 28.0)) and sampler.random_sign
    assert ManifoldSampler(cvae, beta_range="authors").beta_range == pytest.approx((0.2, 56.0))  # on [-1, 1]
    x, y = labeled(24)
    sampler.type1((x + 1) / 2, y)
    beta = sampler.stats["beta"]
    assert (beta > 0).any() and (beta < 0).any()
    assert beta.abs().min() >= 0.1 and beta.abs().max() <= 28.0
    # step = |x~ - x| after clipping: never more than |beta|
    assert (sampler.stats["step"] <= beta.abs() + 1e-4).all()


def _pretrained_bn_classifier(num_classes=4):
    model = tiny_classifier(num_classes)
    model.train()
    with torch.no_grad():
        model(labeled(24)[0])  # BatchNorm has now tracked a batch: it holds statistics
    return model


def test_batchnorm_trains_on_the_mixed_batch_by_default_and_auto_freezes_learned_statistics():
    # The paper is silent and the authors' Keras classifier has no BatchNorm; freezing it cost 17 AUROC points on
    # mnist5k-0to4 (ManifoldTrainer's docstring), so by default it trains on the mixed batch.
    assert not ManifoldTrainer(_pretrained_bn_classifier(), FixedOutliers(), progress=False).freeze_bn
    trained = _pretrained_bn_classifier()
    trainer = ManifoldTrainer(trained, FixedOutliers(), progress=False, freeze_bn="auto")
    assert trainer.freeze_bn  # the model holds statistics: "auto" keeps the outliers from shifting them
    bn = [m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)][0]
    running = bn.running_mean.clone()
    trainer.fit(loader(24, 12), steps=2)
    assert torch.equal(bn.running_mean, running)
    # a fresh model has no statistics to keep: frozen BatchNorm would never learn them
    assert not ManifoldTrainer(tiny_classifier(4), FixedOutliers(), progress=False, freeze_bn="auto").freeze_bn
    with pytest.raises(ValueError, match="freeze_bn must be True, False or 'auto'"):
        ManifoldTrainer(tiny_classifier(4), FixedOutliers(), progress=False, freeze_bn="yes")


def test_mechanism_figures_are_logged():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, beta_range="paper", shell=None, ellipsoid="cholesky").fit(loader())
    trainer = ManifoldTrainer(tiny_classifier(4), sampler, progress=False)
    trainer.fit(loader(24, 12), steps=1)
    logs = trainer.history[-1]
    x = labeled(24)[0][:12]
    from fastood.trainers.manifold import median_nn_distance
    assert trainer.id_nn_distance == pytest.approx(median_nn_distance(x))
    assert 0.2 - 1e-4 <= logs["type1_step"] <= 2.0 + 1e-4  # the paper's beta on [-1, 1] (nothing clipped much)
    assert logs["type1_step_rel"] == pytest.approx(logs["type1_step"] / trainer.id_nn_distance)
    # type-II latents sit on the 95% ellipsoids: their radius is the fitted r_c
    assert min(sampler.radii[:3]) - 1e-6 <= logs["type2_radius"] <= max(sampler.radii[:3]) + 1e-6
    assert set(ManifoldTrainer.progress_keys) <= set(logs)
    # the authors' draw (the default) logs the radius its latents really have: the mean of stats["radius"]
    authors = ManifoldTrainer(tiny_classifier(4), ManifoldSampler(cvae).fit(loader()), progress=False)
    authors.fit(loader(24, 12), steps=1)
    assert authors.history[-1]["type2_radius"] == pytest.approx(float(authors.sampler.stats["radius"].mean()),
                                                                rel=1e-5)


def test_mechanism_idle_warns_when_type1_outliers_do_not_move():
    cvae = tiny_cvae()
    sampler = ManifoldSampler(cvae, beta_range=(0.0, 0.0)).fit(loader())
    trainer = ManifoldTrainer(tiny_classifier(4), sampler, progress=False)
    with pytest.warns(MechanismIdleWarning, match="type-I outliers moved 0 on average"):
        trainer.fit(loader(24, 12), steps=2)
    quiet = ManifoldTrainer(tiny_classifier(4), ManifoldSampler(cvae).fit(loader()), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        quiet.fit(loader(24, 12), steps=2)


def test_max_id_probability_scores_the_id_classes_of_the_n_plus_1_softmax():
    model = nn.Linear(3, 4)
    x = torch.randn(6, 3)
    det = MaxIDProbability(model)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    torch.testing.assert_close(det.score(x), -p[:, :3].amax(1))  # softmax over n + 1, max over the n ID classes
    assert torch.equal(det.predict_class(x), p[:, :3].argmax(1))
    trainer = ManifoldTrainer(tiny_classifier(4), FixedOutliers(), progress=False)
    assert isinstance(trainer.detector(), ExtraClass)
    assert isinstance(trainer.detector("max_id_probability"), MaxIDProbability)
    with pytest.raises(ValueError, match="score must be one of"):
        trainer.detector("energy")


# ------------------------------------------------------------------------------------------------ Jacobian methods
class _OverriddenDecode(ConditionalVAE):
    def decode(self, z, cond):
        return 0.5 * super().decode(z, cond)


@pytest.mark.parametrize("output, act", [("tanh", nn.ReLU), ("linear", nn.ReLU), ("tanh", nn.LeakyReLU)])
def test_tangent_jacobian_equals_torch_func(output, act):
    torch.manual_seed(0)
    cvae = ConditionalVAE(1, 8, 3, 4, width=4, hidden=16, output=output, recon="mse")
    if act is nn.LeakyReLU:   # every ReLU of the decoder replaced: the slope branch of the tangent pass
        for seq in (cvae.decoder_fc, cvae.decoder_conv):
            for i, m in enumerate(seq):
                if isinstance(m, nn.ReLU):
                    seq[i] = nn.LeakyReLU(0.2)
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        jt, gt = decoder_jacobian(cvae, z, y, method="tangents")
        jf, gf = decoder_jacobian(cvae, z, y, method="func")
    assert jt.shape == (5, 64, 4) and jt.is_contiguous()
    torch.testing.assert_close(jt, jf, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt, gf)
    torch.testing.assert_close(jt, autograd_jacobian(cvae, z, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_tangent_jacobian_leaves_the_weights_alone(batch):
    """The tangent pass updates its tangents in place: never the weights they start from (a batch of one makes
    the first layer's tangents a view of its weight unless copied)."""
    cvae = tiny_cvae(image_size=8)
    before = {k: v.clone() for k, v in cvae.state_dict().items()}
    z, y = torch.randn(batch, 4), torch.arange(batch) % 3
    with torch.no_grad():
        for _ in range(2):
            jt, _ = decoder_jacobian(cvae, z, y, method="tangents")
    assert all(torch.equal(before[k], v) for k, v in cvae.state_dict().items())
    torch.testing.assert_close(jt, decoder_jacobian(cvae, z, y, method="func")[0], rtol=1e-5, atol=1e-7)


def test_tangent_jacobian_falls_back_where_it_does_not_apply():
    torch.manual_seed(0)
    odd = _OverriddenDecode(1, 8, 3, 4, width=4, hidden=16)
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="method='tangents' needs a ConditionalVAE"):
        decoder_jacobian(odd, z, y, method="tangents")
    jac, _ = decoder_jacobian(odd, z, y)   # auto: torch.func on the overridden decode
    torch.testing.assert_close(jac, autograd_jacobian(odd, z, y), rtol=1e-4, atol=1e-6)
    hooked = tiny_cvae(image_size=8)
    hooked.decoder_conv[0].register_forward_hook(lambda m, i, o: o * 2)   # a hook changes the decoder's function
    jac, _ = decoder_jacobian(hooked, z, y)
    torch.testing.assert_close(jac, autograd_jacobian(hooked, z, y), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        decoder_jacobian(hooked, z, y, method="reverse")


def test_type1_outliers_are_the_same_as_with_torch_func():
    """The tangent pass replaced vmap(jvp) (issue 22): under a fixed seed the same outliers, stats and random
    stream as the torch.func Jacobian (the MNIST quality protocol's CVAE shape, latent 8)."""
    torch.manual_seed(0)
    cvae = ConditionalVAE(1, 28, 5, 8, width=16, hidden=128)
    x, y = labeled(40, num_classes=5)
    out = {}
    for method in ("func", "tangents"):
        sampler = ManifoldSampler(cvae, beta_range="authors", batch_size=16)
        sampler.jacobian_method = method
        torch.manual_seed(123)
        out[method] = (sampler.type1(x, y), dict(sampler.stats), torch.rand(3))
    (a, sa, ra), (b, sb, rb) = out["func"], out["tangents"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for key in ("beta", "step", "jacobian_norm"):
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(ra, rb)   # the random stream advanced alike


def test_batchnorm_check_warns_when_eval_mode_accuracy_collapses():
    """BatchNorm trained on the mixed ID + outlier batches (freeze_bn=False) can misnormalize ID images in eval
    mode: on Fashion-MNIST (1000 steps from a pretrained SmallCNN) ID accuracy fell to 25.7% while the logged
    training-mode accuracy was 90%, and nothing warned. The check scores the first batch's ID images in eval mode."""
    trainer = ManifoldTrainer(_pretrained_bn_classifier(), FixedOutliers(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MechanismIdleWarning)
        trainer.fit(loader(24, 12), steps=2)
    x, y = trainer._bn_probe
    assert x.shape[0] == 12 and torch.equal(y, labeled(24)[1][:12])   # the first (unshuffled) batch
    model = trainer.model
    with torch.no_grad():
        expected = float((model.eval()(x)[:, :-1].argmax(1) == y).float().mean())
    model.train()
    eval_acc, train_acc = trainer.bn_accuracy_gap([{"acc": 1.0}, {"acc": 0.9}])
    assert eval_acc == pytest.approx(expected) and train_acc == pytest.approx(0.95)
    assert model.training                                            # the check restored the training mode
    assert eval_acc <= 0.75                                          # a barely trained 4-class net
    message = trainer.mechanism_idle([{"acc": 1.0}])                 # logged 100% in training mode: a gap > 20
    assert message and "eval mode" in message and "freeze_bn=True" in message
    assert trainer.mechanism_idle([{"acc": eval_acc}]) is None       # no gap, no warning
    frozen = ManifoldTrainer(_pretrained_bn_classifier(), FixedOutliers(), progress=False, freeze_bn=True)
    frozen.fit(loader(24, 12), steps=1)
    assert frozen.bn_accuracy_gap([{"acc": 1.0}]) is None            # frozen statistics are the ID ones
