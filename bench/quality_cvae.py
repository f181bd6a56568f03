"""CVAE-generated outliers on mnist5k-0to4: the (n+1)-class classifier (Vernekar et al. 2019) and CMG stage 2
(energy and softmax) against the pretrained SmallCNN's maximum softmax probability, over several seeds.

    python bench/quality_cvae.py [--seeds 0 1 2] [--steps 93] [--legacy] [--json PATH] [--png PATH]
                                 [--cvae-cache DIR] [--threads 1] [--quick]

Protocol: every row fine-tunes the same cached pretrained SmallCNN (fastood.pretrain.pretrained_small_cnn) for the
same budget of ``--steps`` mini-batches of 64 ID images (default 93 = 3 epochs), with each method's paper recipe
(the trainers' defaults); the data split is fixed (benchmark seed 0, the pretrained model's) and each seed
re-trains the conditional VAEs (20 epochs, one-hot conditioning for the manifold outliers, learned 32-d
embeddings for CMG; cached in ``--cvae-cache``) and the fine-tuning. Mean +- std over the seeds.

Rows:
  - pretrained MSP / Energy (the baselines);
  - n+1, beta "paper" (U[0.1, 1] of a [0, 1] range = U[0.2, 2] on [-1, 1]), scored by ExtraClass (p(n+1)) and by
    MaxIDProbability (-max_{i<=n} p_i, the paper's better score on MNIST 0-4);
  - n+1, beta "authors" (U(0.1, 28) of a [0, 1] range, random sign; their MNIST 0-9 runs), same two scores;
  - CMG-energy (Energy) and CMG-softmax (ExtraClass): Adam lr 1e-4, no weight decay, last layer only;
  - with ``--legacy``, the former defaults under the same protocol: n+1 with beta U[0.1, 1] in image units
    (BatchNorm training on the mixed batches, as now); CMG with SGD lr 0.01 (momentum 0.9, wd 5e-4) and a 5-d class
    embedding;
  - with ``--ablation`` (only these rows): n+1 with BatchNorm frozen (beta "paper" and the old beta), and CMG at the
    paper's 15 epochs.
Mechanism figures beside AUROC: n+1 -- mean type-I step |x~ - x|_2 relative to the median ID nearest-neighbour
distance (``step/nn``) and the type-II Mahalanobis radius; CMG-energy -- the fraction of ID / pseudo-OOD energies
inside their margins over the last epoch (``in margin``).
A PNG grid (first seed) shows, row by row: ID images, their type-I outliers, the type-I steps stretched to be
visible, type-II outliers, class-mixed images.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood.data import benchmark  # noqa: E402
from fastood.protocol import mean_std as _protocol_mean_std  # noqa: E402
from fastood.detectors import MSP, Energy  # noqa: E402
from fastood.evaluation import evaluate  # noqa: E402
from fastood.models.cvae import ConditionalVAE  # noqa: E402
from fastood.pretrain import pretrained_small_cnn  # noqa: E402
from fastood.samplers.class_mix import ClassMixSampler  # noqa: E402
from fastood.samplers.manifold import ManifoldSampler  # noqa: E402
from fastood.trainers.cmg import CMGTrainer  # noqa: E402
from fastood.trainers.cvae import CVAETrainer  # noqa: E402
from fastood.trainers.manifold import ManifoldTrainer  # noqa: E402

#: The mnist5k CVAE: small enough that type-I outliers (Jacobian included) are cheap on a CPU.
MNIST_CVAE = dict(latent_dim=8, width=16, hidden=128)


def train_cvae(bench, train_loader, conditioning, epochs, seed, embed_dim=None, cache=None):
    """A ConditionalVAE trained with CVAETrainer (seeded), loaded from ``cache`` when it holds one."""
    c, h, _ = bench.shape
    torch.manual_seed(seed)
    kwargs = dict(MNIST_CVAE, embed_dim=embed_dim) if conditioning == "embedding" else dict(MNIST_CVAE)
    cvae = ConditionalVAE(c, h, bench.num_classes, conditioning=conditioning, **kwargs)
    path = None
    if cache:
        path = os.path.join(cache, f"{conditioning}-d{cvae.cond_dim}-e{epochs}-s{seed}.pt")
        if os.path.exists(path):
            cvae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return cvae.eval()
    trainer = CVAETrainer(cvae, progress=False, seed=seed).fit(train_loader, epochs=epochs)
    last = trainer.history[-len(train_loader):]
    print(f"  CVAE ({conditioning}, cond {cvae.cond_dim}): {epochs} epochs, last-epoch loss "
          f"{sum(h['loss'] for h in last) / len(last):.1f}", flush=True)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(cvae.state_dict(), path)
    return cvae.eval()


def sample_grid(path, bench, manifold, class_mix, per_row=12):
    """Rows: ID images; their type-I outliers; the type-I perturbations ``x~ - x`` stretched to the full grey range
    (each image by its own max |value|); type-II outliers (classes 0, 1, 2, ... in turn); class-mixed images."""
    from torchvision.utils import save_image

    labels = bench.id_train.labels
    by_class = [torch.nonzero(labels == c).flatten() for c in range(bench.num_classes)]
    index = [int(by_class[k % bench.num_classes][k // bench.num_classes]) for k in range(per_row)]
    x, y = bench.id_train.images[index], labels[index]
    type1 = manifold.type1(x, y)
    step = type1 - x
    step = step / step.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    rows = [x, type1, step, manifold.type2(per_row, torch.arange(per_row) % bench.num_classes),
            class_mix.sample(None, per_row)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_row, padding=2, pad_value=0.5)
    return path


def _mean(values):
    return _protocol_mean_std(values)[0]  # NaN dropped


def mean_std(values, scale=1.0, fmt="7.2f"):
    mean, std = _protocol_mean_std([scale * v for v in values if v is not None])
    if mean != mean:
        return "n/a"
    return f"{format(mean, fmt)} +- {format(std, fmt.replace('7', '5'))}"


def run_seed(args, bench, pretrained, seed, id_test, ood, png=None):
    """All rows for one seed: {row name: {"auroc", "id_accuracy", "per_set", mechanism figures...}}."""
    train_loader = DataLoader(bench.id_train, batch_size=64, shuffle=True, drop_last=True)
    onehot = train_cvae(bench, train_loader, "onehot", args.cvae_epochs, seed, cache=args.cvae_cache)
    embed = train_cvae(bench, train_loader, "embedding", args.cvae_epochs, seed, cache=args.cvae_cache)
    out = {}

    def record(name, detector, **figures):
        report = evaluate(detector, id_test, ood, progress=False)
        out[name] = {"auroc": report.average["auroc"], "id_accuracy": report.id_accuracy,
                     "per_set": {k: v["auroc"] for k, v in report.metrics.items()}, **figures}
        print(f"  seed {seed} {name}: AUROC {100 * report.average['auroc']:.2f}, ID acc "
              f"{100 * report.id_accuracy:.2f} {figures}", flush=True)

    def nplus1(label, beta, **options):
        sampler = ManifoldSampler(onehot, beta_range=beta)
        sampler.fit(DataLoader(bench.id_train, batch_size=256))
        torch.manual_seed(seed)
        trainer = ManifoldTrainer(copy.deepcopy(pretrained), sampler, extend_head=True, progress=False, seed=seed,
                                  **options)
        trainer.fit(train_loader, steps=args.steps)
        last = trainer.history[-len(train_loader):]
        figures = {"type1_step": _mean([h["type1_step"] for h in last]),
                   "step_over_nn": _mean([h["type1_step_rel"] for h in last]),
                   "type2_radius": _mean([h["type2_radius"] for h in last]), "freeze_bn": trainer.freeze_bn}
        record(f"{label} (ExtraClass)", trainer.detector(), **figures)
        record(f"{label} (MaxIDProbability)", trainer.detector("max_id_probability"), **figures)
        return sampler

    def cmg(label, mode, cvae, **options):
        torch.manual_seed(seed)
        trainer = CMGTrainer(copy.deepcopy(pretrained), cvae, mode=mode, progress=False, seed=seed, **options)
        trainer.fit(train_loader, steps=args.steps)
        last = trainer.history[-len(train_loader):]
        figures = {}
        if mode == "energy":
            figures = {"id_inside": _mean([h["id_inside"] for h in last]),
                       "ood_inside": _mean([h["ood_inside"] for h in last]), "m_in": trainer.m_in,
                       "m_out": trainer.m_out}
        else:
            figures = {"ood_rejected": _mean([h["ood_rejected"] for h in last])}
        record(label, trainer.detector(), **figures)

    if args.ablation:  # which of the two n+1 changes moves AUROC, and CMG at the paper's epoch count
        nplus1("ablation n+1, beta paper, BN frozen", "paper", freeze_bn=True)
        nplus1("ablation n+1, beta U[0.1,1] image units, BN frozen", (0.1, 1.0), freeze_bn=True)
        steps, args.steps = args.steps, 15 * len(train_loader)  # shaoyijia/CMG fine_tune.py: n_epochs = 15
        cmg("ablation CMG-energy, paper's 15 epochs", "energy", embed)
        cmg("ablation CMG-softmax, paper's 15 epochs", "softmax", embed)
        args.steps = steps
        return out
    manifold = nplus1("n+1, beta paper", "paper")
    nplus1("n+1, beta authors", "authors")

    cmg("CMG-energy (Energy)", "energy", embed)
    cmg("CMG-softmax (ExtraClass)", "softmax", embed)

    if args.legacy:
        nplus1("legacy n+1, beta U[0.1,1] image units, BN train", (0.1, 1.0), freeze_bn=False)
        embed5 = train_cvae(bench, train_loader, "embedding", args.cvae_epochs, seed, embed_dim=5,
                            cache=args.cvae_cache)
        sgd = dict(lr=0.01, momentum=0.9, weight_decay=5e-4,)
        for mode, label in (("energy", "legacy CMG-energy, SGD 0.01, embed 5"),
                            ("softmax", "legacy CMG-softmax, SGD 0.01, embed 5")):
            torch.manual_seed(seed)
            model = copy.deepcopy(pretrained)
            trainer = CMGTrainer(model, embed5, mode=mode, progress=False, seed=seed, weight_decay=5e-4, lr=0.01)
            trainer._optimizer = torch.optim.SGD(trainer.trainable_parameters(), **sgd)
            trainer.fit(train_loader, steps=args.steps)
            last = trainer.history[-len(train_loader):]
            figures = ({"id_inside": _mean([h["id_inside"] for h in last]),
                        "ood_inside": _mean([h["ood_inside"] for h in last])} if mode == "energy" else
                       {"ood_rejected": _mean([h["ood_rejected"] for h in last])})
            record(label, trainer.detector(), **figures)
    if png:
        print(f"  sample grid: {sample_grid(png, bench, manifold, ClassMixSampler(embed))}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=93, help="fine-tuning mini-batches per row (93 = 3 epochs)")
    parser.add_argument("--cvae-epochs", type=int, default=20)
    parser.add_argument("--legacy", action="store_true", help="also run the former defaults (before/after)")
    parser.add_argument("--ablation", action="store_true",
                        help="run only the ablation rows: n+1 beta x BatchNorm mode, CMG at the paper's 15 epochs")
    parser.add_argument("--json", help="write every run as JSON to this path")
    parser.add_argument("--png", default="quality_cvae_samples.png", help="sample grid (default: %(default)s)")
    parser.add_argument("--cache", help="cache directory of the pretrained SmallCNN")
    parser.add_argument("--cvae-cache", help="directory to keep trained CVAEs in (per seed)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.cvae_epochs, args.steps = args.seeds[:1], 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = benchmark("mnist5k-0to4", seed=0)
    pretrained = pretrained_small_cnn(cache=args.cache, progress=False)
    id_test = DataLoader(bench.id_test, batch_size=256)
    ood = {k: DataLoader(v, batch_size=256) for k, v in bench.ood.items()}
    baselines = {name: evaluate(det, id_test, ood, progress=False)
                 for name, det in (("pretrained MSP", MSP(pretrained)), ("pretrained Energy", Energy(pretrained)))}
    runs = {}
    for i, seed in enumerate(args.seeds):
        print(f"seed {seed}", flush=True)
        png = args.png if i == 0 and not args.ablation else None
        runs[seed] = run_seed(args, bench, pretrained, seed, id_test, ood, png=png)

    rows = list(runs[args.seeds[0]])
    print(f"\nmnist5k-0to4, {args.steps} fine-tuning mini-batches per row, seeds {args.seeds}; mean over the OOD "
          f"sets {list(ood)}; mean +- std over seeds (percent)")
    header = (f"{'row':52s} {'AUROC':>15s} {'ID acc':>15s}  mechanism")
    print(header + "\n" + "-" * (len(header) + 30))
    for name, report in baselines.items():
        print(f"{name:52s} {100 * report.average['auroc']:7.2f}{'':8s} {100 * report.id_accuracy:7.2f}")
    for name in rows:
        values = [runs[s][name] for s in args.seeds]
        if "step_over_nn" in values[0]:
            mech = (f"step/nn {mean_std([v['step_over_nn'] for v in values], fmt='7.3f')}, "
                    f"type-II radius {mean_std([v['type2_radius'] for v in values])}")
        elif "id_inside" in values[0]:
            mech = (f"in margin: ID {mean_std([v['id_inside'] for v in values], 100, '7.1f')}%, "
                    f"OOD {mean_std([v['ood_inside'] for v in values], 100, '7.1f')}%")
        else:
            mech = f"pseudo-OOD rejected {mean_std([v['ood_rejected'] for v in values], 100, '7.1f')}%"
        print(f"{name:52s} {mean_std([v['auroc'] for v in values], 100):>15s} "
              f"{mean_std([v['id_accuracy'] for v in values], 100):>15s}  {mech}")
    print("\nper-set AUROC (mean over seeds, %)")
    for name in ["pretrained MSP"] + rows:
        if name in baselines:
            sets = {k: v["auroc"] for k, v in baselines[name].metrics.items()}
        else:
            sets = {k: _mean([runs[s][name]["per_set"][k] for s in args.seeds]) for k in ood}
        print(f"  {name:52s} " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sets.items()))
    print(f"total time {time.perf_counter() - start:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "baselines": {k: r.to_dict() for k, r in baselines.items()},
                       "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":
    main()
