"""CMG (Wang et al., ECML 2022), Table 1, Setting 1, row MNIST, reproduced and printed beside the paper's numbers.

    python bench/reproduce_cmg.py [--partitions mnist-0to5 ... mnist-4to9] [--seeds 0] [--clf-steps 1000]
        [--cvae-steps 50] [--stage2-n 6144] [--stage2-steps 1000] [--eval-n 2000] [--out runs/cmg] [--quick]

Setting 1: ID = 6 consecutive MNIST classes (0-5, 1-6, 2-7, 3-8, 4-9; relabelled 0..5), OOD = the other 4
classes of the test split (``fastood.data.benchmark("mnist-0to5")`` ..). AUROC % (OOD positive), mean +- std
over the 5 partitions, for Softmax (MSP), ODIN, Mahalanobis, CMG-softmax and CMG-energy.

The authors' setup (shaoyijia/CMG: ``train.py``, ``eval.py``, ``training/*.py``, ``models/*``):
- classifier: the paper's 9-layer CNN encoder + MLP(2048 -> 512 -> classes)
  (:class:`fastood.models.CMGClassifier`), trained with Adam lr 1e-3, batch 512, 100 epochs (stage 1);
- CVAE (:class:`fastood.models.CMGCVAE`): latent 32, learned 32-d class embeddings, Adam lr 1e-3, batch 512,
  100 epochs, per-pixel MSE + KL / 784;
- stage 2 (:class:`fastood.trainers.CMGTrainer`, ``train="head"``): the MLP (both layers) fine-tuned with the
  encoder frozen (eval mode), Adam lr 1e-4, 15 epochs of 128 ID images + 128 pseudo-OOD images per step
  (4,230 steps on a 36k-image partition); pseudo-OOD = the CVAE's decoder at ``z ~ N(0, 3^2 I)`` (the authors'
  ``scalar = 3.0`` for MNIST) with two classes' embeddings mixed element by element
  (:class:`fastood.samplers.ClassMixSampler`, ``sigma=3``). CMG-softmax: an extra OOD output, scored by its
  softmax probability (:class:`~fastood.detectors.ExtraClass`); CMG-energy: CE + 0.1 (relu(E_in - m_in)^2 +
  relu(m_out - E_out)^2) with m_in / m_out the 20th / 80th percentiles of the energies before stage 2, scored
  by the energy (:class:`~fastood.detectors.Energy`);
- the authors' number per partition is the *best* test AUROC over evaluations every 20 stage-2 steps, the first
  after one step (``fine_tune.py``: ``max_rocauc`` over ``index % 20 == 0``, i.e. after steps 1, 21, 41, ...; so
  here, :func:`next_evaluation`), a selection on the test set. The table gives the final model's AUROC
  (rows "CMG-s", "CMG-e") and, beside it, that best-of-evaluations figure (rows "... best of evaluations every
  20 steps, the authors' protocol").
- Softmax / ODIN / Mahalanobis: the authors' repository has no code for its baselines; here they score the
  stage-1 classifier (MSP; ODIN T = 1000, eps = 0.0014, not tuned; Mahalanobis on the 512-d penultimate layer,
  no input noise, class means and tied covariance from the stage-2 ID images).

Budget (this machine: 2 CPU cores) -- every deviation from the authors' budget, stated again in the table's
``budget`` line:
- stage 1: ``--clf-steps`` Adam steps of ``--clf-batch`` images (default 1,000 x 128 = 128,000 images, 3.6
  epochs; the authors: 100 epochs of 512, ~7,000 steps). Measured on mnist-0to5, seed 0: 200 steps gave Softmax /
  ODIN / Mahalanobis 94.6 / 96.0 / 95.0, 1,000 steps 96.5 / 97.8 / 96.2 (paper 97.6 / 98.1 / 98.4), so the default
  is 1,000 (about 9 min of the 2 cores);
- CVAE: ``--cvae-steps`` steps of ``--cvae-batch`` (default 50 x 128 = 6,400 images, 0.18 of an epoch; the
  authors: 100 epochs of 512). Its encoder's Linear(100352, 1024) and 28 x 28 second convolution make each step
  about 4x a classifier step (2 s against 0.53 s wall, below);
- stage 2 on ``--stage2-n`` ID training images (default 6,144, a seeded subset of the partition's ~36,000) whose
  encoder features are computed once, and a bank of ``--bank-n`` pseudo-OOD images (default = stage2-n) drawn
  once and passed once through the frozen encoder; each stage-2 epoch's pseudo-OOD pool is a random draw from
  the bank (the authors draw 128 fresh images per step). ``--stage2-steps`` steps of 128 + 128 (default 1,000;
  the authors: 4,230). Since the encoder is frozen in stage 2 (and in eval mode, as the authors run it), training
  the head on cached features is the same computation as on images;
- evaluation on ``--eval-n`` seeded ID test images and as many OOD test images (default 2,000 + 2,000; the
  authors: the whole test split, ~6,000 + ~4,000); 0 = the whole test split;
- one run per partition (``--seeds``; the paper: 5 runs).

Time, measured on the quiet 2-core machine (the stage-wise wall and CPU seconds of every run are in the table's
meta): a stage-1 step of 128 takes ~0.53 s wall, a CVAE step ~2 s, encoding the features ~35 s, the baselines ~55 s,
each stage 2 ~14 s. At the default budget one partition takes ~12 min (stage 1 532 s, CVAE ~100 s, the rest ~110 s),
the five about an hour.

Differences of the networks (see :mod:`fastood.models.cmg_nets`): images in [-1, 1] (the authors': [0, 1]),
the classifier has 6 outputs in stage 1 (the authors': 11, of which 6 are used) and CMG-softmax's OOD output is
added at stage 2; class pairs of the mixes are always two different classes (the authors' may repeat a class).

Every finished cell (stage 1 networks, CVAE, baselines, each CMG mode, each partition x seed) is cached under
``--out`` (``cells/``, ``models/``; stage 1 and the CVAE also checkpoint under ``ckpt/`` while training): an
interrupted run continues where it stopped. Writes ``--out``/cmg_table.{txt,md,json,csv} and prints
``paper | fastood (mean +- std) | difference``.
"""
import argparse
import contextlib
import copy
import os
import shutil
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood.data import benchmark, seeded_subset  # noqa: E402
from fastood.data.benchmarks import CMG_PARTITIONS  # noqa: E402
from fastood.protocol import PaperRow, cached_model, open_run, report, run_grid  # noqa: E402

#: Table 1, Setting 1, row MNIST (AUROC %, mean +- std over the 5 partitions).
PAPER = {"Softmax": (97.6, 0.7), "ODIN": (98.1, 1.1), "Mahalanobis": (98.4, 0.4), "CMG-s": (98.3, 0.2),
         "CMG-e": (99.0, 0.2)}
SIGMA_MNIST = 3.0  # the authors' `scalar` for MNIST (fine_tune.py)


class Watch:
    """Wall and process CPU seconds (all threads) of named stages: ``with w("train"): ...``; ``w.times``,
    ``w.cpu``. CPU seconds / cores estimate the wall time on free cores when the machine is shared."""

    def __init__(self):
        self.times, self.cpu = {}, {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 1)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - c0, 1)


def adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def encode(encoder, images, batch=500):
    """Flattened features [N, 2048] of images [N, 1, 28, 28] from the frozen encoder (eval mode)."""
    encoder.eval()
    return torch.cat([encoder(images[i:i + batch]).flatten(1) for i in range(0, len(images), batch)]) \
        if len(images) else torch.empty(0, 2048)


class FeatureBank:
    """A sampler for :class:`~fastood.trainers.CMGTrainer` on features: ``sample(model, n, shape)`` -> ``n`` rows
    of a fixed bank of pseudo-OOD features (without replacement while n <= bank size), from torch's default
    generator (which the trainer seeds per epoch)."""

    def __init__(self, features):
        self.features = features

    def sample(self, model=None, n=0, shape=None, context=None):
        m = self.features.shape[0]
        idx = torch.randperm(m)[:n] if n <= m else torch.randint(m, (n,))
        return self.features[idx]


def scores_of(mode, logits):
    """CMG-softmax: probability of the OOD output; CMG-energy: -logsumexp (higher = more OOD)."""
    if mode == "softmax":
        return torch.softmax(logits.double(), 1)[:, -1]
    return -torch.logsumexp(logits.double(), 1)


def metrics_of(detector, id_loader, ood_loaders):
    from fastood.evaluation import evaluate

    report = evaluate(detector, id_loader, ood_loaders, progress=False)
    return {k: {m: 100.0 * v for m, v in d.items()} for k, d in report.metrics.items()}


@torch.no_grad()
def active_latents(cvae, images, threshold: float = 0.01):
    """``(active, kl)``: how many latent dimensions the CVAE's encoder uses -- those whose posterior mean varies
    across ``images`` (variance > ``threshold``, the "active units" of Burda et al. 2016) -- and the mean KL to the
    prior in nats. 0 active dimensions = posterior collapse: the decoder ignores z, and every pseudo-OOD image is a
    function of its mixed class embedding alone, whatever sigma."""
    from fastood.models.cvae import kl_to_standard_normal

    mu, logvar = cvae.encode(images)
    return int((mu.var(0) > threshold).sum()), float(kl_to_standard_normal(mu, logvar).mean())


def next_evaluation(step: int, every: int) -> int:
    """The stage-2 step after which the next test evaluation happens: the authors' ``fine_tune.py`` evaluates when
    ``index % every == 0`` with ``index`` 0 for the first step, i.e. after steps 1, every + 1, 2 * every + 1, ..."""
    return 1 if step < 1 else step + every - (step - 1) % every


def stage2(mode, clf, data, args, seed, log):
    """CMG stage 2 in ``mode`` on cached features; returns the cell's dict (final metrics, the authors'
    best-of-evaluations AUROC, the trajectory, the mechanism telemetry)."""
    from fastood.detectors import Energy, ExtraClass
    from fastood.metrics import ood_metrics
    from fastood.trainers.cmg import CMGTrainer
    from tqdm.auto import tqdm

    head = copy.deepcopy(nn.Sequential(clf.fc1, clf.relu, clf.fc))
    torch.manual_seed(seed)
    trainer = CMGTrainer(head, FeatureBank(data["bank"]), mode=mode, split=(nn.Identity(), head), batch_size=128,
                         seed=seed, progress=False)
    head = trainer.head
    loader = DataLoader(TensorDataset(data["f_train"], data["y_train"]), batch_size=512)
    f_id, f_ood = data["f_id"], data["f_ood"]

    @torch.no_grad()
    def auroc():
        head.eval()
        s_id, s_ood = scores_of(mode, head(f_id)), scores_of(mode, head(f_ood))
        return 100.0 * ood_metrics(s_id, s_ood)["auroc"]

    trajectory = [(0, auroc())]  # before stage 2: not one of the authors' evaluations
    bar = tqdm(total=args.stage2_steps, desc=f"CMG-{mode}", leave=False, disable=args.quiet)
    while trainer.step < args.stage2_steps:
        trainer.fit(loader, steps=min(next_evaluation(trainer.step, args.eval_every), args.stage2_steps))
        bar.update(trainer.step - bar.n)
        trajectory.append((trainer.step, auroc()))
    bar.close()
    head.eval()
    detector = ExtraClass(head) if mode == "softmax" else Energy(head)
    ood_name = data["ood_name"]
    metrics = metrics_of(detector, DataLoader(TensorDataset(f_id, data["y_id"]), batch_size=1000),
                         {ood_name: DataLoader(TensorDataset(f_ood), batch_size=1000)})[ood_name]
    with torch.no_grad():
        logits = head(f_id)[:, :clf.fc.out_features]
        acc = 100.0 * float((logits.argmax(1) == data["y_id"]).float().mean())
    last = trainer.history[-min(len(trainer.history), 50):]
    telemetry = {k: sum(float(h[k]) for h in last) / len(last)
                 for k in ("loss", "ce", "acc", "ood_rejected", "id_inside", "ood_inside", "reg") if k in last[0]}
    if mode == "energy":
        telemetry.update(m_in=trainer.m_in, m_out=trainer.m_out)
    out = {"mode": mode, "metrics": metrics, "acc": acc, "steps": trainer.step,
           "best_auroc": max(a for _, a in trajectory[1:]) if len(trajectory) > 1 else trajectory[0][1],
           "trajectory": trajectory, "telemetry_last50": telemetry}
    log(f"  CMG-{mode}: AUROC {metrics['auroc']:.2f} (best of evaluations {out['best_auroc']:.2f}), acc {acc:.2f}, "
        + ", ".join(f"{k} {v:.3g}" for k, v in telemetry.items()))
    return out


def baselines(clf, data, args, log):
    """Softmax (MSP), ODIN and Mahalanobis on the stage-1 classifier."""
    from fastood.detectors import MSP, ODIN, Mahalanobis

    head = nn.Sequential(clf.fc1, clf.relu, clf.fc).eval()
    ood_name = data["ood_name"]
    id_feat = DataLoader(TensorDataset(data["f_id"], data["y_id"]), batch_size=1000)
    ood_feat = {ood_name: DataLoader(TensorDataset(data["f_ood"]), batch_size=1000)}
    out = {"Softmax": metrics_of(MSP(head), id_feat, ood_feat)[ood_name]}
    maha = Mahalanobis(head)
    maha.fit(DataLoader(TensorDataset(data["f_train"], data["y_train"]), batch_size=1000))
    out["Mahalanobis"] = metrics_of(maha, id_feat, ood_feat)[ood_name]
    clf.eval()
    out["ODIN"] = metrics_of(ODIN(clf, T=args.odin_T, epsilon=args.odin_eps),
                             DataLoader(data["id_eval"], batch_size=250),
                             {ood_name: DataLoader(data["ood_eval"], batch_size=250)})[ood_name]
    with torch.no_grad():
        out["acc"] = 100.0 * float((head(data["f_id"]).argmax(1) == data["y_id"]).float().mean())
    log("  baselines: " + ", ".join(f"{k} {v['auroc']:.2f}" for k, v in out.items() if k != "acc")
        + f"; acc {out['acc']:.2f}")
    return out


def run_cell(name, seed, args, cells, log):
    """Stage 1, the CVAE, the baselines and both CMG modes on one partition with one seed (sub-cells cached)."""
    from fastood.models import CMGClassifier, CMGCVAE
    from fastood.samplers.class_mix import ClassMixSampler
    from fastood.trainers.cvae import CVAETrainer
    from fastood.trainers.standard import StandardTrainer

    sw = Watch()
    progress = not args.quiet
    bench = benchmark(name, seed=seed)
    n = bench.num_classes
    train = seeded_subset(bench.id_train, args.train_n or None, seed)
    ckpt = None if args.quick else os.path.join(cells.root, "ckpt")
    log(f"{name} seed {seed}: {len(train)} training images, {n} classes")

    def loader(batch):
        return DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    clf_tag = f"clf_{name}_s{seed}_{args.clf_steps}x{args.clf_batch}_t{args.train_n}"

    def train_clf(model):
        StandardTrainer(model, optimizer=adam(1e-3), scheduler=None, seed=seed, progress=progress,
                        checkpoint_dir=ckpt and os.path.join(ckpt, clf_tag)).fit(loader(args.clf_batch),
                                                                                 steps=args.clf_steps)

    with sw("stage1_classifier"):
        torch.manual_seed(seed)
        clf = cached_model(cells, clf_tag, CMGClassifier(n), train_clf, log)
    clf.eval()

    cvae_tag = f"cvae_{name}_s{seed}_{args.cvae_steps}x{args.cvae_batch}_t{args.train_n}{args.kl_tag}"

    def new_cvae():
        cvae = CMGCVAE(n)
        if args.cvae_kl_weight is not None:  # an ablation: the authors' objective is kl_weight 4 (see CMGCVAE)
            cvae.kl_weight = float(args.cvae_kl_weight)
        return cvae

    def train_cvae(cvae):
        CVAETrainer(cvae, optimizer=adam(1e-3), scheduler=None, seed=seed, progress=progress,
                    checkpoint_dir=ckpt and os.path.join(ckpt, cvae_tag)).fit(loader(args.cvae_batch),
                                                                              steps=args.cvae_steps)

    with sw("stage1_cvae"):
        torch.manual_seed(seed)
        cvae = cached_model(cells, cvae_tag, new_cvae(), train_cvae, log)
    cvae.eval()
    active, kl = active_latents(cvae, train.images[:1000])
    log(f"{name} seed {seed}: CVAE latent dimensions in use {active} of {cvae.latent_dim} (KL {kl:.3g} nats)")
    if ckpt is not None:  # the weights are cached: the CVAE's 1.3 GB checkpoint (Adam state) is not needed
        for tag in (clf_tag, cvae_tag):
            shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)

    data = {}

    def features():
        if data:
            return data
        with sw("features"):
            ood_name, ood = next(iter(bench.ood.items()))
            eval_n = args.eval_n or None  # 0: every test image
            id_eval, ood_eval = seeded_subset(bench.id_test, eval_n, seed), seeded_subset(ood, eval_n, seed)
            stage2_set = seeded_subset(train, args.stage2_n or None, seed + 1)
            encoder = nn.Sequential(clf.encoder, nn.Flatten()).eval()
            torch.manual_seed(seed + 2)
            sampler = ClassMixSampler(cvae, sigma=args.sigma)
            bank = torch.cat([sampler.sample(None, min(256, args.bank_n - i)) for i in range(0, args.bank_n, 256)])
            data.update(ood_name=ood_name, id_eval=id_eval, ood_eval=ood_eval,
                        f_train=encode(encoder, stage2_set.images), y_train=stage2_set.labels,
                        bank=encode(encoder, bank), f_id=encode(encoder, id_eval.images), y_id=id_eval.labels,
                        f_ood=encode(encoder, ood_eval.images))
        return data

    base = f"{name}_s{seed}_{args.tag}"
    out = {"name": name, "seed": seed, "n_train": len(train), "n_eval_id": None, "n_eval_ood": None,
           "cvae_active_latents": active, "cvae_kl": kl}
    with sw("baselines"):
        out["baselines"] = cells.run(f"{base}_baselines", lambda: baselines(clf, features(), args, log), log)
    for mode in ("softmax", "energy"):
        with sw(f"stage2_{mode}"):
            out[f"cmg_{mode}"] = cells.run(f"{base}_cmg-{mode}",
                                           lambda: stage2(mode, clf, features(), args, seed, log), log)
    ood = next(iter(bench.ood.values()))
    out["n_eval_id"] = min(len(bench.id_test), args.eval_n or len(bench.id_test))
    out["n_eval_ood"] = min(len(ood), args.eval_n or len(ood))
    out["times_s"], out["cpu_s"] = sw.times, sw.cpu
    log(f"{name} seed {seed}: wall (CPU) seconds: "
        + ", ".join(f"{k} {v:.0f} ({sw.cpu[k]:.0f})" for k, v in sw.times.items()))
    return out


def auroc_of(result, method):
    if method in ("Softmax", "ODIN", "Mahalanobis"):
        return result["baselines"][method]["auroc"]
    return result["cmg_softmax" if method == "CMG-s" else "cmg_energy"]["metrics"]["auroc"]


def per_partition(results, partitions, fn):
    """The mean over seeds of ``fn(result)`` for each partition that has results."""
    values = []
    for name in partitions:
        got = [fn(r) for r in results if r["name"] == name]
        if got:
            values.append(sum(got) / len(got))
    return values


def build_rows(results, partitions, seeds):
    table = "Table 1, Setting 1, MNIST (AUROC %)"
    runs = f"mean +- std over {len(partitions)} partitions x {len(seeds)} run(s) each (paper: 5 partitions x 5 runs)"
    rows = []
    for method, (value, std) in PAPER.items():
        rows.append(PaperRow(table, method, value, per_partition(results, partitions, lambda r: auroc_of(r, method)),
                             note=f"paper +- {std}; {runs}"))
    for mode, short in (("softmax", "CMG-s"), ("energy", "CMG-e")):
        rows.append(PaperRow(table, f"{short}, best of evaluations every 20 steps (the authors' protocol)",
                             PAPER[short][0],
                             per_partition(results, partitions, lambda r: r[f"cmg_{mode}"]["best_auroc"]),
                             note="max test AUROC during stage 2, as the authors' fine_tune.py reports"))
    rows.append(PaperRow(table, "Energy of the stage-1 network (CMG-e's trajectory before stage 2)", None,
                         per_partition(results, partitions, lambda r: r["cmg_energy"]["trajectory"][0][1]),
                         note="stage 2 starts here: the final CMG-e row minus this one is what stage 2 added"))
    rows.append(PaperRow(table, "CMG-e minus Softmax", round(PAPER["CMG-e"][0] - PAPER["Softmax"][0], 1),
                         per_partition(results, partitions, lambda r: auroc_of(r, "CMG-e") - auroc_of(r, "Softmax")),
                         note="issue 19: CMG-e above Softmax in every partition"))
    for name in partitions:
        got = [r for r in results if r["name"] == name]
        if not got:
            continue
        sub = f"partition {name} (ID {name.split('-')[1]}, {len(got)} run(s))"
        for method in PAPER:
            rows.append(PaperRow(sub, method, None, [auroc_of(r, method) for r in got]))
        rows.append(PaperRow(sub, "ID accuracy: stage 1 / CMG-s / CMG-e", None,
                             [r["baselines"]["acc"] for r in got],
                             note="CMG-s " + ", ".join(f"{r['cmg_softmax']['acc']:.2f}" for r in got)
                                  + "; CMG-e " + ", ".join(f"{r['cmg_energy']['acc']:.2f}" for r in got)))
        tel_s = got[0]["cmg_softmax"]["telemetry_last50"]
        tel_e = got[0]["cmg_energy"]["telemetry_last50"]
        rows.append(PaperRow(sub, "mechanism: CMG-s pseudo-OOD rejected (last 50 steps, %)", None,
                             [100.0 * r["cmg_softmax"]["telemetry_last50"].get("ood_rejected", float("nan"))
                              for r in got], note=f"telemetry {tel_s}"))
        rows.append(PaperRow(sub, "mechanism: CMG-e ID / pseudo-OOD energies inside margins (%)", None,
                             [100.0 * r["cmg_energy"]["telemetry_last50"].get("ood_inside", float("nan"))
                              for r in got],
                             note=f"value: pseudo-OOD inside; id_inside {100 * tel_e.get('id_inside', 0):.1f}%; "
                                  f"m_in {tel_e.get('m_in', 0):.3g}, m_out {tel_e.get('m_out', 0):.3g}"))
        if all("cvae_active_latents" in r for r in got):  # cells cached before this figure existed lack it
            rows.append(PaperRow(sub, "mechanism: CVAE latent dimensions in use (of 32)", None,
                                 [r["cvae_active_latents"] for r in got],
                                 note="KL " + ", ".join(f"{r['cvae_kl']:.3g}" for r in got)
                                      + " nats; 0 = posterior collapse, the pseudo-OOD ignore sigma"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", nargs="+", default=list(CMG_PARTITIONS), choices=list(CMG_PARTITIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="runs per partition (paper: 5)")
    p.add_argument("--clf-steps", type=int, default=1000, help="stage-1 Adam steps (authors: 100 epochs of 512)")
    p.add_argument("--clf-batch", type=int, default=128, help="stage-1 batch (authors: 512)")
    p.add_argument("--cvae-steps", type=int, default=50, help="CVAE Adam steps (authors: 100 epochs of 512)")
    p.add_argument("--cvae-batch", type=int, default=128, help="CVAE batch (authors: 512)")
    p.add_argument("--stage2-n", type=int, default=6144, help="ID training images stage 2 uses (authors: all)")
    p.add_argument("--bank-n", type=int, default=None, help="pseudo-OOD bank (default: --stage2-n)")
    p.add_argument("--stage2-steps", type=int, default=1000, help="stage-2 steps of 128 + 128 (authors: 4230)")
    p.add_argument("--eval-every", type=int, default=20, help="stage-2 test evaluations (the authors': 20 steps)")
    p.add_argument("--cvae-kl-weight", type=float, default=None,
                   help="ablation: the CVAE's KL weight (default: the authors' objective, CMGCVAE's 4)")
    p.add_argument("--sigma", type=float, default=SIGMA_MNIST, help="latent std of the pseudo-OOD (authors: 3)")
    p.add_argument("--odin-T", type=float, default=1000.0)
    p.add_argument("--odin-eps", type=float, default=0.0014)
    p.add_argument("--eval-n", type=int, default=2000, help="ID and OOD test images scored (0: all)")
    p.add_argument("--train-n", type=int, default=None, help="subsample the ID training set (quick runs)")
    p.add_argument("--out", default="runs/cmg")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="tiny budget (one partition, 256 training images, a few steps, 100 + 100 eval; no checkpoints)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        if argv is None or "--partitions" not in argv:
            args.partitions = args.partitions[:1]
        args.clf_steps, args.clf_batch, args.cvae_steps, args.cvae_batch = 2, 32, 1, 16
        args.stage2_n, args.stage2_steps, args.eval_every, args.eval_n = 128, 20, 10, 100
        args.train_n = args.train_n or 256
    args.bank_n = args.bank_n or args.stage2_n
    for name in ("clf_steps", "clf_batch", "cvae_steps", "cvae_batch", "stage2_n", "bank_n", "stage2_steps",
                 "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_n < 0:
        p.error(f"--eval-n must be >= 0, got {args.eval_n}")
    if args.cvae_kl_weight is not None and not (args.cvae_kl_weight >= 0 and args.cvae_kl_weight < float("inf")):
        p.error(f"--cvae-kl-weight must be a finite number >= 0, got {args.cvae_kl_weight}")
    args.kl_tag = "" if args.cvae_kl_weight is None else f"_kl{args.cvae_kl_weight:g}"  # the KL ablation's cells
    args.tag = (f"c{args.clf_steps}x{args.clf_batch}_v{args.cvae_steps}x{args.cvae_batch}_n{args.stage2_n}"
                f"_b{args.bank_n}_s{args.stage2_steps}_e{args.eval_n}_sig{args.sigma}_t{args.train_n}_ev1{args.kl_tag}")
    cells, log = open_run(args)
    t0 = time.time()
    results = run_grid(cells, args.partitions, args.seeds, lambda name, seed: f"{name}_s{seed}_{args.tag}",
                       lambda name, seed: run_cell(name, seed, args, cells, log), log)
    rows = build_rows(results, args.partitions, args.seeds)
    meta = {"command": "python bench/reproduce_cmg.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "budget": f"stage 1 {args.clf_steps} Adam steps x {args.clf_batch} (authors: 100 epochs x 512); CVAE "
                      f"{args.cvae_steps} steps x {args.cvae_batch} (authors: 100 epochs x 512); stage 2 "
                      f"{args.stage2_steps} steps x (128 ID + 128 pseudo-OOD) on {args.stage2_n} ID images' features "
                      f"and a bank of {args.bank_n} pseudo-OOD images (authors: 4230 steps, all ~36k ID images, "
                      f"fresh pseudo-OOD every step); sigma {args.sigma}"
                      + ("" if args.cvae_kl_weight is None else f"; CVAE KL weight {args.cvae_kl_weight:g} (ablation; "
                                                                 "the authors' objective: 4)")
                      + (f"; ID training set subsampled to {args.train_n}" if args.train_n else ""),
            "runs": f"{len(args.seeds)} run(s) per partition (seeds {args.seeds}); the paper: 5 runs -- fewer here "
                    "to fit 2 CPU cores",
            "evaluation": f"{args.eval_n or 'all'} ID and {args.eval_n or 'all'} OOD test images per partition "
                          "(seeded subsets); the authors: the whole test split",
            "wall_s (this invocation)": round(time.time() - t0, 1),
            "cell wall_s": {f"{r['name']} s{r['seed']}": r.get("wall_s") for r in results},
            "stage wall_s": {f"{r['name']} s{r['seed']}": r.get("times_s") for r in results},
            "stage cpu_s (all threads)": {f"{r['name']} s{r['seed']}": r.get("cpu_s") for r in results}}
    report(args.out, "cmg_table", rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
