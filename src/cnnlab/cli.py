"""The ``cnnlab`` command: argparse sub-commands over the Python API of the same names.

User mistakes reach the terminal as one line and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnlab import __version__
from cnnlab.config import TTA_NAMES
from cnnlab.core.errors import Interrupted, UserError, one_line

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

# Library errors name Python parameters in backquotes (`index`); on the command line they are the flags
# that set them: `limit_test` is --limit-test, except where a flag is named otherwise.
FLAG_NAMES = {"channels": "--channel", "allow_hosts": "--allow-host"}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, not a usage block; and it records every flag of every
    command, so that :func:`as_flags` spells a parameter as a flag only where one exists."""

    flags: set[str] = set()

    def add_argument(self, *names: str, **options: object) -> argparse.Action:  # type: ignore[override]
        Parser.flags.update(n for n in names if n.startswith("--"))
        return super().add_argument(*names, **options)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _add_settings(p: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """A flag for every training setting (but those in ``leave_out``), from its declaration in
    :class:`cnnlab.config.TrainConfig`: a switch pair (--tta/--no-tta) for a yes-or-no setting, a value
    otherwise; ``amp`` and ``mlflow`` take an optional value (--amp, --amp force; --mlflow, --mlflow URI) beside
    --no-amp and --no-mlflow. Any other value is refused by the configuration's check."""
    from cnnlab import config

    for name, f in config.FIELDS.items():
        if not f.metadata["flag"] or name in leave_out:
            continue
        if name == "tta":  # spelt as evaluate and predict spell it: --tta [flip|translate], --no-tta
            _add_tta(p, f.metadata["help"])
            continue
        flag, help, kinds = "--" + name.replace("_", "-"), f.metadata["help"], config.kinds(name)
        options = config.choices(name)
        if options and help is None:
            help = " or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        if bool in kinds and (options or str in kinds):  # --amp [force], --mlflow [URI]
            p.add_argument(flag, nargs="?", const=True, metavar="|".join(options) or f.metadata["metavar"], help=help)
            p.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False, help="off")
        elif bool in kinds:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            kind = next((k for k in kinds if k in (int, float)), str)
            p.add_argument(flag, type=kind, help=help)


# --tta VALUE of evaluate and predict → the setting ``tta`` (--no-tta is "none")
TTA_VALUES = {name: tta for tta, name in TTA_NAMES.items() if tta is not False}


def _add_tta(p: argparse.ArgumentParser, help: str, before_files: bool = False) -> None:
    """--tta (flip), --tta flip|translate and --no-tta, the values of the training setting ``tta``; unset: the
    run's own (evaluate, predict) or the recipe's (train). ``before_files``: a file may follow the flag."""
    def value(text: str) -> bool | str:
        if text not in TTA_VALUES:
            raise argparse.ArgumentTypeError(f"{text!r} is neither flip nor translate"
                                             + (", nor a file that exists" if before_files else "")
                                             + "; give --tta, --tta flip, --tta translate or --no-tta")
        return TTA_VALUES[text]

    p.add_argument("--tta", nargs="?", const=True, type=value, metavar="flip|translate", help=help)
    p.add_argument("--no-tta", dest="tta", action="store_const", const=False, help="one view")


def _tta_alone(argv: list[str]) -> list[str]:
    """``--tta`` last, before another flag or before a file is the flag alone: written ``--tta=flip`` so that it
    cannot take the run folder or image after it (``cnnlab evaluate --tta RUN_DIR``) as its value."""
    if not argv or argv[0] not in ("evaluate", "predict"):
        return argv

    def alone(i: int) -> bool:
        after = argv[i + 1] if i + 1 < len(argv) else None
        return after is None or (after not in TTA_VALUES and (after.startswith("-") or Path(after).exists()))

    return ["--tta=flip" if a == "--tta" and alone(i) else a for i, a in enumerate(argv)]


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small model on the bundled sample and evaluate it (CPU, a few minutes)")
    p.add_argument("--out", help="the run folder (default runs/demo-TIME)")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.toml", help="settings to apply over the recipe")
    _add_settings(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                                                       "(or give RUN_DIR/checkpoints/best.pt to continue from that)")
    p.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="stop after this many steps with a checkpoint; continue later with --resume")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train one run per seed, one after the other, into the group folder --out (OUT/seed-S "
                        "each, and OUT/group.json), and print the mean ± std of their final figures; "
                        "--resume OUT continues the unfinished ones")


def _lr_find_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lr-find", help="sweep the learning rate on a copy of the model and plot the loss against it",
        argument_default=argparse.SUPPRESS,
        description="The learning-rate range test (Smith 2017): train a copy of the model --steps steps with the "
                    "learning rate growing exponentially from --start-lr to --end-lr, on the data, model and recipe "
                    "the training flags say, until the loss diverges. Plots the smoothed loss against the rate with "
                    "two suggestions (steepest descent, valley) and the configured --lr. Writes no run folder.")
    p.add_argument("--config", metavar="FILE.toml", help="settings to apply over the recipe")
    _add_settings(p, leave_out=("out", "mlflow"))
    p.add_argument("--steps", type=int, default=100, help="steps of the sweep at most (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="the first step's learning rate (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="the last step's learning rate (default 10)")
    p.add_argument("--out", metavar="FILE.png", default="lr-find.png", help="the plot (default lr-find.png)")
    p.add_argument("--json", action="store_true", default=False,
                   help="print the curve and suggestions as one JSON document")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="top-1 with its interval, per-class figures, calibration and the confusion "
                                        "matrix of a run")
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument("--dataset", help="default: the run's dataset")
    p.add_argument("--data-dir")
    p.add_argument("--limit-test", type=int, help="default: the test images the run reported on")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="folder for metrics.json, reliability.png and confusion.png (default RUN_DIR/eval)")
    _add_tta(p, "test-time flip augmentation: average each image's logits with its mirror image's; --tta "
                "translate: airbench's six views (the image and its mirror, each also shifted one pixel up-left "
                "and down-right); default: as the run was scored while training", before_files=True)
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the run's validation images and keep it in RUN_DIR/calibration.json; "
                        "predict, report and serve then divide the logits by it")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _summary_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="the layers of a model as in Table 1, with counted params and MACs")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--image-size", type=int, help="default: the model's own (224, or 32 for the CIFAR nets)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--width", type=int, help="default: the paper's (64, or 16 for the CIFAR nets)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the models --model knows, with counted params and MACs")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--all", action="store_true", help="also list every torchvision and timm model by name")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k labels with probabilities for image files and folders",
        description="Predict image files of any size, format and mode, and every file in folders (recursively), "
                    "with the preprocessing the model was trained with.",
        epilog="Exit status: 0 when every file was predicted; 1 when some could not be read as images (each gets "
               "one line on stderr, the others are still predicted); 2 for a usage mistake.")
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+")
    p.add_argument("--top-k", type=int, default=5, help="how many labels per image (default 5)")
    _add_tta(p, "average each image's logits with its mirror image's; --tta translate: over airbench's six "
                "views (default: as the run was scored)", before_files=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true",
                   help='print one JSON document on stdout: [{"image", "top": [{"label", "prob"}, ...]}, ...]')


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the model as ONNX, torch.export (.pt2) or TorchScript, with its classes and "
                       "preprocessing as metadata",
        description="The exported model takes float32 pixels in [0, 1], shape (N, C, S, S) with S the run's "
                    "image size, normalises them itself and returns logits. Class names, image size, mean and "
                    "std are stored in the file (ONNX metadata_props; extra file metadata.json of a .pt2 or "
                    "TorchScript archive).")
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"),
                   help="pt2: a torch.export ExportedProgram (torch.export.load); torchscript is deprecated in torch")
    p.add_argument("--out", required=True, metavar="FILE")


def _labels_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labels", help="the training images whose label is likely wrong (confident learning)",
        description="Confident learning (cleanlab's find_label_issues) on out-of-sample probabilities: by default "
                    "the run's model on its validation split; with --folds K, K-fold cross-validation on its "
                    "training split, which trains K copies of the run with its own settings (about K - 1 times "
                    "its training time). Lists the candidates, most likely wrong first, with the given and the "
                    "suggested label, and writes RUN_DIR/label_issues.json, which the report and cnnlab serve show.")
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--folds", type=int, metavar="K",
                   help="cross-validate on the training split with K folds instead of using the validation split")
    p.add_argument("--data-dir", help="where the run's dataset lives now (default: where it was trained from)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print label_issues.json's document on stdout")


def _visualize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="look inside a trained network: filters, feature maps, CAMs, attributions …")
    p.add_argument("method", metavar="METHOD", help="filters, features, top-images, deconv, invert, maximize, dream, "
                                                     "cam, attribute, embedding (the test set on a t-SNE map, and "
                                                     "TensorBoard's projector), sanity (how far to trust each CAM "
                                                     "and attribution: randomisation tests, deletion, insertion, "
                                                     "ROAD), or dossier (a folder of unit pages: one per channel of a "
                                                     "layer)")
    p.add_argument("path", metavar="RUN_DIR|CKPT")
    p.add_argument("--image", nargs="+", metavar="PATH", help="image files (any size or format; resized and "
                                                              "normalised as the checkpoint says)")
    p.add_argument("--index", nargs="+", type=int, metavar="N", help="images of the run's test set, by index")
    p.add_argument("--count", type=int, metavar="K", help="how many test images (from index 0; embedding: spread over "
                                                          "the test set), channels or filters")
    p.add_argument("--layer", nargs="+", metavar="NAME", help="stage names (conv1, conv2_x … conv5_x, fc for the "
                   "ResNets; conv1 … conv5 for AlexNet and VGG) or module paths (layer4.1.left.3); default: "
                   "found from the model; sanity: the cascade steps to measure")
    p.add_argument("--target", nargs="+", metavar="CLASS", help="class name or index (default: the predicted class)")
    p.add_argument("--channel", nargs="+", type=int, metavar="C", help="channels of the layer")
    p.add_argument("--kind", nargs="+", metavar="KIND", help="cam: grad-cam grad-cam++ score-cam layer-cam; "
                   "attribute: saliency guided-backprop guided-grad-cam integrated-gradients smoothgrad occlusion; "
                   "sanity: any of these (default: all)")
    p.add_argument("--steps", type=int, help="optimisation steps (invert, maximize, dream; dossier: 64 by default) "
                                            "or integration steps")
    p.add_argument("--random-labels", metavar="RUN|EPOCHS|auto|none",
                   help="sanity: a run trained on permuted labels, or epochs to train one here for the data "
                        "randomisation test (default auto: one epoch when that is cheap)")
    p.add_argument("--check-with", metavar="RUN_DIR", help="maximize: show the class models to this independently "
                   "trained run (same classes and input size) and state the probability it gives each its class")
    p.add_argument("--json", action="store_true", help="sanity: print the table as JSON; maximize: the class models' "
                                                       "probabilities and files as JSON")
    p.add_argument("--units", nargs="+", type=int, metavar="N", help="dossier: the channels to write pages for "
                                                                    "(default: every channel of the layer)")
    p.add_argument("--variants", type=int, help="dossier: diverse maximised images per unit (default 4)")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/viz/METHOD; dossier: its pages, default "
                                 "RUN_DIR/viz/dossier/LAYER)")
    p.add_argument("--tensorboard", action="store_true", help="also log the images to the run's TensorBoard")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="where the run's dataset is, for --index and top-images")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML page about a run: accuracy, curves, mistakes, what it learned",
        description="Write one HTML file that opens from disk with no server or network: what was trained, final "
                    "accuracies, Table 1, training curves, per-class accuracy, confusion matrix, most-confused "
                    "pairs, misclassified images, the test set as a map, top losses and typical images, conv1 "
                    "filters, feature maps, Grad-CAM and class models.")
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.html", help="where to write it (default RUN_DIR/report.html); "
                                                      "folders on the way that do not exist are created")
    p.add_argument("--check-with", metavar="RUN_DIR", help="show the class models to this independently trained run "
                                                          "(same classes and input size) and state what it makes of "
                                                          "them")
    p.add_argument("--device", default="auto")


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="several runs on one HTML page: error curves overlaid, final accuracies, params, MACs, speed",
        description="Overlay the runs' training error (dashed) and test error (solid) per epoch, as He et al. 2015 "
                    "do in Fig. 4 and 6, and tabulate final accuracies, parameters, MACs and images/s. Prints the "
                    "table and writes one self-contained HTML page.")
    p.add_argument("paths", metavar="RUN_DIR", nargs="+")
    p.add_argument("--out", metavar="FILE.html", help="where to write the page (default compare.html)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON document")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="explore runs in the browser: predictions, CAMs, feature maps, channels, curves",
        description="Start a local web app over the runs: upload or pick an image, see the top-5 and every CAM and "
                    "attribution with its trust scores, click through the layers' feature maps and channels, and "
                    "the training curves and confusion matrix, the test set as a map and its mistakes. Offline; "
                    "bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("paths", metavar="RUN_DIR", nargs="+")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests that name the server NAME (a host name or address others reach it "
                        "by, e.g. with --host 0.0.0.0); repeatable. Answered without it: 127.0.0.1, localhost, ::1 "
                        "and --host")


def build_parser() -> Parser:
    parser = Parser(prog="cnnlab", description="Train a CNN for image recognition, then see what it learned.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in (_demo_parser, _train_parser, _lr_find_parser, _evaluate_parser, _summary_parser, _models_parser,
                _predict_parser, _export_parser, _labels_parser, _visualize_parser, _report_parser, _compare_parser,
                _serve_parser):
        add(sub)
    return parser


class _Notes(logging.Handler):
    """The library's notes and warnings (the ``cnnlab`` logger) as one escaped line each on stderr,
    with the parameters they name spelled as flags.

    It looks ``sys.stderr`` up at every message, so that a redirected stderr (a test's) is honoured.
    """

    def emit(self, record: logging.LogRecord) -> None:
        print(one_line(as_flags(record.getMessage())), file=sys.stderr)


def _show_notes() -> None:
    logger = logging.getLogger("cnnlab")
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes(logging.INFO))
        logger.setLevel(logging.INFO)


def as_flags(message: str) -> str:
    """A library message with the parameters it names (`limit_test`) spelled as the flags that set them
    (--limit-test); a parameter no command has a flag for (`mean`, a TOML key) loses its quotes only."""
    if not Parser.flags:
        build_parser()

    def flag(m: re.Match[str]) -> str:
        name = FLAG_NAMES.get(m[1], "--" + m[1].replace("_", "-"))
        return name if name in Parser.flags else m[1]

    return re.sub(r"`(\w+)`", flag, message)


def _terminated(signum: int, frame: object) -> None:
    raise Interrupted(signum, "stopped by SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_tta_alone(list(sys.argv[1:] if argv is None else argv)))
    _show_notes()
    # SIGTERM (what SLURM and Kubernetes send) ends a command as Ctrl-C does: one line, exit 143, files
    # being written left whole. Training acts on it at its next step, with a checkpoint (see train.engine).
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"cnnlab {args.command}: {one_line(str(e))}", file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        print(f"cnnlab {args.command}: error: {one_line(as_flags(str(e)))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        # A full disk or a folder we may not write to: the machine, not our code, is at fault.
        print(f"cnnlab {args.command}: error: {one_line(str(e.filename or 'a file'))}: {e.strerror}; "
              "free some space, or check the folder's permissions or choose another output folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Each command imports what it runs inside its function: torch alone takes seconds to import, and
# `cnnlab --help` (or a usage mistake) should answer at once.


def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab.config import resolve
    from cnnlab.train.engine import train
    from cnnlab.train.seeds import is_group, train_group

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "stop_after", "seeds")}
    stop_after, seeds = getattr(args, "stop_after", None), getattr(args, "seeds", None)
    main = os.environ.get("RANK", "0") == "0"  # torchrun starts one copy per rank; one says it
    if "resume" in args:
        extra = sorted(set(given) - {"device"}) + (["seeds"] if seeds is not None else [])
        if extra or "config" in args:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra + (["config"] if "config" in args else []))
            raise UserError(f"--resume continues the saved configuration; drop {flags} (only --device may change)")
        if is_group(args.resume):
            return _print_group(train_group(resume=args.resume, device=given.get("device"), stop_after=stop_after),
                                main)
        result = train(resume=args.resume, device=given.get("device"), stop_after=stop_after)
    else:
        if seeds is not None and "seed" in given:
            raise UserError("--seeds sets each run's seed; drop --seed")
        cfg = resolve(toml_path=getattr(args, "config", None), overrides=given)
        if main:
            print(one_line("configuration: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items())))
        if seeds is not None:
            return _print_group(train_group(cfg, seeds, stop_after=stop_after), main)
        result = train(cfg, stop_after=stop_after)
    if main:
        _print_result(result)
    return 0


def _print_group(result, main: bool) -> int:
    """A group's end: where it stopped, or the spread of its runs' final figures."""
    from cnnlab.train.seeds import summary

    if not main:
        return 0
    if not result.finished:
        print(f"stopped before every seed finished as asked; continue with: cnnlab train --resume {result.group_dir}")
        return 0
    print(format_spread(summary(result.group_dir)))
    print(f"group folder: {result.group_dir}")
    _print_mlflow(result.group_dir)
    return 0


def format_spread(s: dict[str, Any]) -> str:
    """A group summary (:func:`cnnlab.train.seeds.summary`) as lines for the terminal: mean ± std (min–max)."""
    n = max((f["n"] for f in s["summary"].values()), default=0)
    lines = [f"{len(s['runs'])} seeds ({' '.join(map(str, s['seeds']))}), mean ± std over the {n} finished:"]
    for key, f in s["summary"].items():
        if not f["n"]:
            continue
        scale, unit, digits = ((1, " s", 1) if key == "seconds" else (100, "%", 2) if key.endswith("_acc")
                               else (1, "", 4))
        mean, std, low, high = (None if v is None else f"{scale * v:.{digits}f}"
                                for v in (f["mean"], f["std"], f["min"], f["max"]))
        lines.append(f"  {key:>10}  {mean}{'' if std is None else ' ± ' + std}{unit}  ({low}–{high}{unit})")
    return "\n".join(lines)


def _print_result(result) -> None:
    if not result.last or result.last.get("step") != result.step:
        print(f"stopped at step {result.step} as asked; continue with: cnnlab train --resume {result.run_dir}")
        return
    def figures(r: dict) -> str:
        return ", ".join(f"{k} {r[k]:.4f}" for k in ("train_acc", "val_acc", "test_acc") if r.get(k) is not None)

    if result.best:  # ended by early stopping: the run's result is best.pt, not the last epoch
        print(f"stopped after epoch {result.last['epoch']}, {result.stopped}")
        print(f"result: best.pt, epoch {result.best['epoch']}: {figures(result.best)}")
    else:
        print(f"finished {result.last['epoch']} epochs: {figures(result.last)}")
    print(f"run folder: {result.run_dir}")
    print(f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tb'}")
    _print_mlflow(result.run_dir)


def _print_mlflow(folder: Path) -> None:
    """Where a run or group that logs to MLflow (``--mlflow``) can be seen; nothing for one that does not."""
    from cnnlab.train.tracking import describe

    seen = describe(folder)
    if seen is not None:
        print(one_line(f"  MLflow: {seen}"))


EVALUATE_JSON = ("top1", "n", "per_class", "confusion", "top1_interval", "top5", "per_class_figures", "calibration",
                 "temperature", "calibrated", "fitted")


def cmd_lr_find(args: argparse.Namespace) -> int:
    from cnnlab.config import resolve
    from cnnlab.train.lr_find import CAVEAT, lr_find, plot

    sweep = {k: getattr(args, k) for k in ("steps", "start_lr", "end_lr", "out", "json")}
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", *sweep)}
    cfg = resolve(toml_path=getattr(args, "config", None), overrides=given)
    result = lr_find(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    png = plot(result, args.out)
    if args.json:
        print(json.dumps({**result.to_json(), "plot": str(png)}))
        return 0
    end = f"stopped at {result.lrs[-1]:.3g}, where the loss diverged" if result.diverged else "no divergence"
    print(f"swept {len(result.lrs)} steps from {result.start_lr:g} to {result.lrs[-1]:.3g} ({end})")
    if result.valley is None or result.steepest is None:
        print("the curve is too short to suggest a rate: lower --start-lr or raise --steps")
    else:
        print(f"steepest descent at {result.steepest:.2g}, valley at {result.valley:.2g}; configured --lr "
              f"{result.recipe_lr:g}")
        print(f"suggested: --lr {result.valley:.2g} (the valley)")
    print(f"caveat: {CAVEAT}")
    print(one_line(f"wrote {png}"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnlab.evaluate import evaluate

    result = evaluate(args.path, dataset=args.dataset, data_dir=args.data_dir, limit_test=args.limit_test,
                      device=args.device, out=args.out, tta=args.tta, calibrate=args.calibrate)
    if args.json:
        print(json.dumps({k: result[k] for k in EVALUATE_JSON}))
        return 0
    from cnnlab.core.metrics import tta_name

    flip = f", with {tta_name(result['tta'])}" if result["tta"] else ""
    # Class names and paths come from files: escaped, so that they cannot move the cursor or forge lines.
    print(one_line(f"top-1 accuracy {100 * result['top1']:.2f}% on {result['n']} test images "
                   f"({result['dataset']}{flip})"))
    for name, acc in result["per_class"].items():
        print(one_line(f"  {name:>20}  {'-' if acc is None else f'{100 * acc:.1f}%'}"))
    for line in _evaluate_figures(result):
        print(one_line(line))
    print(one_line("wrote " + ", ".join(result["outputs"])))
    return 0


def _evaluate_figures(result: dict[str, Any]) -> list[str]:
    """The lines of ``cnnlab evaluate`` beyond top-1 and per-class accuracy."""
    lo, hi = result["top1_interval"]
    lines = [f"95% interval on top-1: {100 * lo:.2f}–{100 * hi:.2f}% (percentile bootstrap over the test images)"]
    if result["top5"] is not None:
        lines.append(f"top-5 accuracy {100 * result['top5']:.2f}%")
    lines.append(f"  {'class':>20}  precision  recall     F1")
    for name, f in result["per_class_figures"].items():
        lines.append(f"  {name:>20}  {100 * f['precision']:8.1f}%  {100 * f['recall']:5.1f}%  {100 * f['f1']:5.1f}%")
    fitted = result["fitted"]
    if fitted:
        lines.append(f"fitted temperature {fitted['temperature']:.3f} on {fitted['validation_images']} validation "
                     f"images (NLL {fitted['nll_before']:.4f} -> {fitted['nll_after']:.4f}); kept in {fitted['file']}")
    shown = [("calibration", result["calibration"])]
    if result["calibrated"]:
        shown.append((f"with temperature {result['temperature']:.3f}", result["calibrated"]))
    for name, c in shown:
        lines.append(f"{name}: ECE {100 * c['ece']:.2f}%, MCE {100 * c['mce']:.2f}% ({len(c['bins'])} bins), "
                     f"NLL {c['nll']:.4f}, Brier {c['brier']:.4f}")
    return lines


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnlab.core.limits import MAX_CLASSES, MAX_IMAGE_SIZE, MAX_WIDTH
    from cnnlab.models.summary import format_table, summarize

    limits = {"image_size": MAX_IMAGE_SIZE, "num_classes": MAX_CLASSES, "width": MAX_WIDTH}
    for name, most in limits.items():
        value = getattr(args, name)
        if value is not None and not 1 <= value <= most:
            raise UserError(f"`{name}` must be between 1 and {most} (got {value})")
    result = summarize(args.model, image_size=args.image_size, num_classes=args.num_classes, width=args.width)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnlab.core.limits import MAX_CLASSES
    from cnnlab.models import FAMILIES
    from cnnlab.models.external import timm_available, timm_names, torchvision_names
    from cnnlab.models.summary import catalog, format_catalog

    if not 1 <= args.num_classes <= MAX_CLASSES:
        raise UserError(f"`num_classes` must be between 1 and {MAX_CLASSES} (got {args.num_classes})")
    entries = catalog(num_classes=args.num_classes)
    tv = list(torchvision_names())
    tm = list(timm_names()) if timm_available() else []
    if args.json:
        print(json.dumps({"models": entries, "families": FAMILIES, "torchvision": tv, "timm": tm,
                          "timm_installed": timm_available()}))
        return 0
    print(f"cnnlab's own models ({args.num_classes} classes, each at its own input size and width):\n")
    print(format_catalog(entries))
    print(f"\ntorchvision:NAME  any of torchvision's {len(tv)} classification models, "
          "e.g. torchvision:mobilenet_v3_small, "
          "torchvision:resnet50 (--weights DEFAULT: its published ImageNet weights)")
    if timm_available():
        print(f"timm:NAME         any of timm's {len(tm)} models, e.g. timm:resnet18, timm:efficientnet_b0 "
              "(--weights DEFAULT or a pretrained tag)")
    else:
        print("timm:NAME         any timm model, once timm is installed: pip install 'cnnlab[timm]'")
    if args.all:
        print("\n" + "\n".join(["torchvision:" + n for n in tv] + ["timm:" + n for n in tm]))
    print("\ncnnlab summary MODEL shows a model's layers; its params and MACs are counted, not quoted.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cnnlab.demo import demo

    demo(args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnlab.predict import predict

    results = predict(args.path, args.images, top_k=args.top_k, device=args.device, tta=args.tta)
    good = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(one_line(f"cnnlab predict: {r['image']}: {r['error']}"), file=sys.stderr)
    if args.json:
        print(json.dumps(good))
    else:
        for r in good:
            scaled = f"  (temperature {r['temperature']:.3f})" if r["temperature"] is not None else ""
            print(one_line(f"{r['image']}  " + "  ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"])
                           + scaled))
    return 0 if len(good) == len(results) else 1


LABELS_SHOWN = 20  # candidates printed; label_issues.json holds them all


def cmd_labels(args: argparse.Namespace) -> int:
    from cnnlab.labels import labels

    result = labels(args.path, folds=args.folds, device=args.device, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(result))
        return 0
    n, found = result["examined"], result["found"]
    where = (f"the {n} validation images (held out of training)" if result["source"] == "validation" else
             f"the {n} training images, each scored by the one of {result['folds']} cross-validation models "
             "trained without it")
    print(f"confident learning on {where}: {found} likely label error{'s' if found != 1 else ''} "
          f"({100 * found / max(n, 1):.1f}%)")
    if result["fold_accuracy"]:
        print("top-1 of each fold model on the images it held out: "
              + ", ".join(f"{100 * a:.1f}%" for a in result["fold_accuracy"]))
    if found:
        print(f"  {'rank':>4}  {'image':>7}  {'given':>14}  {'suggested':>14}  self-confidence")
    for issue in result["issues"][:LABELS_SHOWN]:
        print(one_line(f"  {issue['rank']:>4}  {'#' + str(issue['index']):>7}  {issue['given']:>14}  "
                       f"{issue['suggested']:>14}  {issue['self_confidence']:.3f}"))
    if found > LABELS_SHOWN:
        print(f"  … and {found - LABELS_SHOWN} more")
    print(one_line(f"wrote {result['file']} (images are numbered by their position among the dataset's "
                   "training images)"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnlab.export import export

    result = export(args.path, args.format, args.out)
    meta = result["metadata"]
    print(f"wrote {result['out']} ({args.format}; max |difference| from PyTorch {result['max_abs_diff']:.2g})")
    print(f"  input: float32 (N, {meta['in_channels']}, {meta['image_size']}, {meta['image_size']}) in [0, 1], "
          f"normalised inside the model; output: logits over {len(meta['classes'])} classes")
    return 0


def _choices(args: argparse.Namespace) -> dict[str, Any]:
    """The choices of cnnlab visualize that were given, as the library takes them."""
    return {name: getattr(args, name) for name in ("image", "index", "count", "layer", "target", "channel", "kind",
                                                   "steps", "check_with") if getattr(args, name) is not None}


def random_labels(text: str) -> str | int | Path | None:
    """--random-labels as the library takes it: "auto", a number of epochs, a run's path, or None (none, 0)."""
    if text in ("none", "0"):
        return None
    if text == "auto":
        return "auto"
    if text.isdigit():
        return int(text)
    if text.startswith("-") and text[1:].isdigit():  # argparse hands "-1" over as a value, not a flag
        raise UserError(f"--random-labels {text} is not a number of epochs: give 1 or more epochs, a run trained "
                        "on permuted labels, auto or none")
    return Path(text)


def cmd_visualize(args: argparse.Namespace) -> int:
    from cnnlab.visualize import visualize

    if args.method == "sanity":
        return _sanity(args)
    if args.method == "dossier":
        return _dossier(args)
    for flag, value in (("--units", args.units), ("--variants", args.variants)):
        if value is not None:
            raise UserError(f"{flag} is for cnnlab visualize dossier; {args.method} does not use it")
    if args.random_labels:
        raise UserError(f"--random-labels is for cnnlab visualize sanity; {args.method} does not use it")
    if args.method == "maximize":
        return _maximize(args)
    if args.json:
        raise UserError(f"--json is for cnnlab visualize sanity and maximize; {args.method} does not use it")
    pngs = visualize(args.method, args.path, out=args.out, tensorboard=args.tensorboard, device=args.device,
                     data_dir=args.data_dir, **_choices(args))
    for png in pngs:
        print(f"wrote {png}")
    return 0


def _maximize(args: argparse.Namespace) -> int:
    """cnnlab visualize maximize: the figures, and a line per check with another run (or all as JSON)."""
    from cnnlab.visualize import shown

    results, pngs = shown("maximize", args.path, out=args.out, tensorboard=args.tensorboard, device=args.device,
                          data_dir=args.data_dir, **_choices(args))
    if args.json:
        print(json.dumps({"results": [r.to_json() for r in results], "files": [str(p) for p in pngs]}))
        return 0
    for result in results:
        if result.check is not None:
            print(f"class models {result.check.summary()}")
    for png in pngs:
        print(f"wrote {png}")
    return 0


def _dossier(args: argparse.Namespace) -> int:
    from cnnlab.report.dossier import dossier

    given = [name for name in ("image", "index", "count", "target", "channel", "kind", "random_labels", "json",
                               "tensorboard", "check_with") if getattr(args, name)]
    if given:
        raise UserError(f"dossier does not use --{given[0].replace('_', '-')}; it takes --layer (one), --units, "
                        "--variants, --steps and --out")
    if args.layer and len(args.layer) > 1:
        raise UserError("dossier writes the pages of one layer; give one --layer")

    def say(fraction: float) -> None:
        print(f"\r… {100 * fraction:3.0f}%", end="", file=sys.stderr, flush=True)

    files = dossier(args.path, args.layer[0] if args.layer else None, out=args.out, units=args.units or (),
                    variants=4 if args.variants is None else args.variants,
                    steps=64 if args.steps is None else args.steps, device=args.device, data_dir=args.data_dir,
                    progress=say)
    print(file=sys.stderr)
    print(f"wrote {files[0]} and {len(files) - 1} unit page{'s' if len(files) != 2 else ''} beside it")
    return 0


def _sanity(args: argparse.Namespace) -> int:
    from cnnlab.visualize import sanity

    if args.tensorboard:
        raise UserError("sanity does not use --tensorboard; it writes cascade.png and sanity.json")
    result, files = sanity(args.path, random_labels=random_labels(args.random_labels or "auto"), out=args.out,
                           device=args.device, data_dir=args.data_dir,
                           progress=None if args.json else lambda m: print(f"… {m}", file=sys.stderr, flush=True),
                           **_choices(args))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.table())
    print(f"data randomisation: {as_flags(result.random_labels_note)}")
    for file in files:
        print(f"wrote {file}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnnlab.report import report

    print(f"wrote {report(args.path, out=args.out, device=args.device, check_with=args.check_with)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cnnlab.report.compare import compare, format_table, format_tests

    out, runs, found = compare(args.paths, out=args.out)
    if args.json:
        print(json.dumps({"page": str(out), "runs": [r.row() for r in runs], "tests": found}))
        return 0
    print(format_table(runs))
    if found:
        print(format_tests(found))
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cnnlab.serve import serve

    def ready(url: str) -> None:
        runs = "a run" if len(args.paths) == 1 else f"{len(args.paths)} runs"
        print(f"cnnlab serve: exploring {runs} at {url}  (Ctrl-C stops it)", flush=True)

    serve(args.paths, host=args.host, port=args.port, ready=ready, allow_hosts=args.allow_host)
    return 0


COMMANDS = {"train": cmd_train, "lr-find": cmd_lr_find, "evaluate": cmd_evaluate, "summary": cmd_summary,
            "models": cmd_models, "demo": cmd_demo,
            "predict": cmd_predict, "export": cmd_export, "labels": cmd_labels,
            "visualize": cmd_visualize, "report": cmd_report, "compare": cmd_compare, "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
