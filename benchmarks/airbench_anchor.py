"""The anchor: airbench94's own training, re-created outside cnnlab's trainer, timed on this machine.

K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024 (arXiv:2404.00498), and its
``airbench94.py`` (github.com/KellerJordan/cifar10-airbench): 94.01% mean test accuracy over 1,000 runs
of 9.9 epochs on an A100. This script trains the way that script does, with its published
hyper-parameters (:data:`HYP`), in fp32 (airbench trains in fp16 on a GPU), on a CPU or a GPU:

- all 50,000 training images, batches of 1,024 with the last partial batch dropped, 9.9 epochs
  (``ceil(48 · 9.9) = 476`` steps, the last epoch cut short);
- each image mirrored or not at random once, then the whole set mirrored on every odd epoch; every
  image shifted by up to 2 pixels each epoch, its edge reflected in;
- the network of ``cnnlab.models.airbench`` (the same layers), its first layer set to whiten the 2×2
  patches of the first 5,000 training images (filters fixed, bias trained for 3 epochs), every other
  convolution an identity on its first input channels;
- the cross-entropy with label smoothing 0.2 *summed* over the batch; Nesterov SGD, momentum 0.85, its
  rates per 1,024 images divided by ``1024 · (1 + 1/(1 − momentum))``, weight decay 0.0153 per 1,024
  images decoupled from the rate, the BatchNorm biases at 64× the rate (not the decay);
- the triangular schedule from 0.2× up to 1× at 23% of the steps and down to 0.07×;
- from epoch 3 (0-based), every 5 steps, the Lookahead blend of the weights and an average of them at a
  decay of ``0.95⁵ · (step/total)³``, the weights set back to the average at every epoch's end;
- test-time augmentation of level 2: each image, its mirror image and both shifted by one pixel up-left
  and down-right (six views; half the weight on the unshifted pair).

The parts shared with cnnlab (network, initialisations, shifts, Lookahead, schedule, TTA) are cnnlab's
functions, each tested against a hand computation in ``tests/test_airbench.py``; the training loop, the
data order, the loss, the optimiser's groups and the timing are airbench's, written here.

After every epoch the test accuracy (with the TTA, and without) is measured and written to the JSON at
once, with the time: ``time_s`` is airbench's own measure up to that epoch (the whitening, the training
epochs and one TTA evaluation of the test set; the per-epoch evaluations it does not count are in
``eval_s``), so the time to 88% or 94% can be read off the curve.

    python -m benchmarks.airbench_anchor                         # 1 run on $CNNLAB_CIFAR10_JPEG, this CPU
    python -m benchmarks.airbench_anchor --seeds 0 1 2           # three runs
    python -m benchmarks.airbench_anchor --limit 2048 --limit-test 500 --epochs 2   # a dry run in a minute

Writes ``benchmarks/results/airbench-anchor-{cpu,cuda}-YYYYMMDD.json`` (``--out``, ``--name``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import report

HYP: dict[str, Any] = {  # airbench94.py's hyp, flattened
    "epochs": 9.9, "batch_size": 1024, "lr": 11.5, "momentum": 0.85, "weight_decay": 0.0153, "bias_scaler": 64.0,
    "label_smoothing": 0.2, "lookahead_start_epochs": 3, "lookahead_decay_base": 0.95, "lookahead_decay_pow": 3.0,
    "lookahead_every": 5, "whiten_bias_epochs": 3, "translate": 2, "width": 64, "tta_level": 2,
    "whiten_images": 5000,
}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def make_net(width: int, train_x: torch.Tensor, prepare) -> nn.Module:
    """airbench94's network, identity-initialised, its first layer whitening the first training images."""
    from cnnlab.models import build
    from cnnlab.train.initialise import dirac_init, whiten_first_conv

    model = build("airbench94", num_classes=10, width=width)
    dirac_init(model)
    whiten_first_conv(model, prepare(train_x[:HYP["whiten_images"]]))
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """One of airbench's steps: the label-smoothed loss summed over the batch, backward, the optimiser."""
    loss = loss_fn(model(x), y).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def optimiser(model: nn.Module, batch_size: int) -> torch.optim.SGD:
    """airbench's decoupled rates: per 1,024 images of a summed loss, the decay independent of the rate."""
    momentum = HYP["momentum"]
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = HYP["lr"] / kilostep
    decay = HYP["weight_decay"] * batch_size / kilostep
    lr_biases = lr * HYP["bias_scaler"]
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for name, p in trained if "norm" in name]  # their scales do not train
    others = [p for name, p in trained if "norm" not in name]
    return torch.optim.SGD([{"params": norm_biases, "lr": lr_biases, "weight_decay": decay / lr_biases},
                            {"params": others, "lr": lr, "weight_decay": decay / lr}],
                           momentum=momentum, nesterov=True)


class Loader:
    """airbench's training order: one random mirror per image for the run, the whole set mirrored on odd
    epochs, a fresh shift of up to ``translate`` pixels (edges reflected) per image and epoch, a fresh
    order per epoch, the last partial batch dropped."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, prepare, device) -> None:
        self.images, self.labels, self.batch_size, self.prepare = images, labels, batch_size, prepare
        self.device = device
        self.mirrored = torch.rand(len(images)) < 0.5

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def epoch(self, epoch: int):
        from cnnlab.core import transforms

        pad = HYP["translate"]
        offsets = torch.randint(0, 2 * pad + 1, (len(self.images), 2))
        flips = self.mirrored ^ bool(epoch % 2)
        order = torch.randperm(len(self.images))
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = transforms.pad_crop(transforms.flip(self.images[index], flips[index]), offsets[index], pad,
                                    reflect=True)
            yield self.prepare(x).to(self.device), self.labels[index].to(self.device)


@torch.no_grad()
def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prepare, device,
                  tta: bool | str) -> float:
    from cnnlab.core.metrics import logits

    model.eval()
    correct = 0
    for i in range(0, len(labels), 2000):
        x = prepare(images[i:i + 2000]).to(device)
        correct += (logits(model, x, tta).argmax(1).cpu() == labels[i:i + 2000]).sum().item()
    model.train()
    return correct / len(labels)


def train_once(data, seed: int, epochs: float, device: torch.device, record) -> dict[str, Any]:
    """One airbench94 run; ``record(curve)`` after every epoch."""
    from cnnlab.core.spec import Preprocess
    from cnnlab.train.ema import Lookahead
    from cnnlab.train.engine import triangle

    torch.manual_seed(seed)
    prepare = Preprocess(32, 3, MEAN, STD).to_input
    batch_size = HYP["batch_size"]
    start = time.perf_counter()
    model = make_net(HYP["width"], data.train_x, prepare).to(device)
    whiten_s = time.perf_counter() - start
    loader = Loader(data.train_x, data.train_y, batch_size, prepare, device)
    total = math.ceil(len(loader) * epochs)
    opt = optimiser(model, batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: triangle(i, total))
    average = Lookahead(model, HYP["lookahead_every"], HYP["lookahead_start_epochs"] * len(loader) + 1, total)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")
    curve: list[dict[str, Any]] = []
    step, train_s, eval_s = 0, whiten_s, 0.0
    for epoch in range(math.ceil(epochs)):
        model.whiten[0].bias.requires_grad_(epoch < HYP["whiten_bias_epochs"])
        tick = time.perf_counter()
        for x, y in loader.epoch(epoch):
            loss = train_step(model, opt, loss_fn, x, y)
            schedule.step()
            step += 1
            average.update(step)
            if step >= total:
                break
        average.end_epoch(step)
        train_s += time.perf_counter() - tick
        tick = time.perf_counter()
        tta = test_accuracy(model, data.test_x, data.test_y, prepare, device, "translate")
        tta_s = time.perf_counter() - tick
        plain = test_accuracy(model, data.test_x, data.test_y, prepare, device, False)
        eval_s += time.perf_counter() - tick
        curve.append({"epoch": epoch + 1, "step": step, "train_s": train_s, "tta_eval_s": tta_s,
                      "time_s": train_s + tta_s, "eval_s": eval_s, "test_acc_tta": tta, "test_acc": plain,
                      "train_loss_last_batch": loss.item() / len(y)})
        record(curve)
    reached = {f"{t:.2f}": next((c["time_s"] for c in curve if c["test_acc_tta"] >= t), None) for t in report.TARGETS}
    return {"seed": seed, "steps": step, "final_test_acc_tta": curve[-1]["test_acc_tta"],
            "final_test_acc": curve[-1]["test_acc"], "time_s": curve[-1]["time_s"], "time_to": reached,
            "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.airbench_anchor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="a cnnlab dataset (default: folder:$CNNLAB_CIFAR10_JPEG, else the sample)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=float, default=HYP["epochs"], help="default airbench's 9.9")
    parser.add_argument("--limit", type=int, help="train on the first N images (a dry run)")
    parser.add_argument("--limit-test", type=int, help="test on the first N images (a dry run)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="let glibc reuse freed blocks, as cnnlab's trainer does on Linux (off: as airbench's "
                             "own code runs; on a CPU its batch-1024 activations are then faulted in every step)")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--name", help="file name of the JSON (default airbench-anchor-DEVICE-DATE.json)")
    args = parser.parse_args(argv)
    from cnnlab.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from cnnlab.train.device import keep_freed_memory

        keep_freed_memory()
    archive = os.environ.get("CNNLAB_CIFAR10_JPEG")
    dataset = args.dataset or (f"folder:{Path(archive).resolve()}" if archive else "sample")
    data = load_dataset(dataset)
    data.train_x, data.train_y = data.train_x[:args.limit], data.train_y[:args.limit]
    data.test_x, data.test_y = data.test_x[:args.limit_test], data.test_y[:args.limit_test]
    if len(data.train_y) < HYP["batch_size"]:
        parser.error(f"--limit {args.limit} leaves no full batch of {HYP['batch_size']} images")
    device = torch.device(args.device)
    document: dict[str, Any] = {
        "benchmark": "airbench-anchor", "machine": report.machine_info(), "command": report.command_line(),
        "dataset": "CIFAR-10 (JPEG copy)" if "cifar10-jpeg" in dataset else dataset,
        "train": len(data.train_y), "test": len(data.test_y), "device": str(device),
        "precision": "fp32", "keep_freed_memory": args.keep_freed_memory, "hyp": HYP, "epochs": args.epochs, "runs": [],
    }
    date = document["machine"]["date"].replace("-", "")
    name = args.name or f"airbench-anchor-{device.type}-{date}.json"
    for seed in args.seeds:
        def record(curve: list[dict[str, Any]], seed: int = seed) -> None:
            last = curve[-1]
            print(f"seed {seed} epoch {last['epoch']}: test {100 * last['test_acc_tta']:.2f}% with TTA "
                  f"({100 * last['test_acc']:.2f}% without) at {last['time_s']:.1f} s", file=sys.stderr, flush=True)
            report.write_json({**document, "runs": [*document["runs"], {"seed": seed, "curve": curve}]}, name,
                              args.out)

        document["runs"].append(train_once(data, seed, args.epochs, device, record))
    path = report.write_json(document, name, args.out)
    for run in document["runs"]:
        print(f"seed {run['seed']}: {100 * run['final_test_acc_tta']:.2f}% test with TTA after {run['time_s']:.1f} s; "
              f"88% at {run['time_to']['0.88']} s, 94% at {run['time_to']['0.94']} s")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
