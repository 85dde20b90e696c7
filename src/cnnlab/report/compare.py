"""``cnnlab compare RUN_DIR…``: several runs on one page, as He et al. 2015 compare nets in Fig. 4 and 6.

The runs' training error (the running mean over each epoch, dashed) and test error (solid) per epoch,
one colour per run, overlaid as in the paper's figures; then their final accuracies, parameters and
multiply-accumulates (counted on the model, as ``cnnlab summary`` does) and training speed, read from the
run folders (``config.json``, ``metrics.jsonl``). A group of seeds (``cnnlab train --seeds``) is one row of
mean ± std; its members can be given as runs too. Whether two of them differ: two runs scored on the same
test images get McNemar's exact test (each run's best checkpoint scores its test set), two groups Welch's
t-test on their test accuracies. The page is the report's: one self-contained HTML file, no script,
nothing fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from cnnlab.config import TrainConfig, from_saved
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.metrics import score
from cnnlab.core.significance import mcnemar, welch
from cnnlab.models.summary import summarize
from cnnlab.report.charts import _fig_uri, plain_text
from cnnlab.report.page import CSP, CSS, document_end, document_head, e
from cnnlab.report.sections import read_metrics
from cnnlab.run import load
from cnnlab.train.seeds import is_group, summary

__all__ = ["Compared", "Group", "compare", "differences", "format_table", "gather"]

COLORS = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]


@dataclass
class Compared:
    """One run, as the comparison shows it."""

    name: str  # the run folder's name (made unique on the page)
    path: Path
    config: TrainConfig
    epochs: list[dict[str, Any]]
    params: int | None
    macs: int | None
    note: str | None = None  # why params/MACs are missing

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1]

    @property
    def images_per_s(self) -> float | None:
        """Mean training speed over the epochs after the first (which pays for start-up), or the only one."""
        speeds = [r["images_per_s"] for r in self.epochs if r.get("images_per_s")]
        later = speeds[1:] or speeds
        return float(np.mean(later)) if later else None

    @property
    def train_seconds(self) -> float:
        return float(sum(r.get("seconds", 0.0) for r in self.epochs))

    def row(self) -> dict[str, Any]:
        last, cfg = self.last, self.config
        return {
            "run": self.name, "path": str(self.path), "model": cfg.model, "width": cfg.width,
            "image_size": cfg.image_size, "dataset": cfg.dataset, "epochs": last.get("epoch"),
            "train_error": None if last.get("train_acc") is None else 1 - last["train_acc"],
            "train_acc": last.get("train_acc"), "val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"),
            "params": self.params, "macs": self.macs, "images_per_s": self.images_per_s,
            "train_seconds": self.train_seconds,
        }


@dataclass
class Group:
    """A group of seeds, as the comparison shows it: one row of mean ± std over its finished runs."""

    name: str
    path: Path
    members: list[Compared]  # its finished runs, named GROUP/seed-S
    seeds: list[int]
    spread: dict[str, dict[str, Any]]  # figure → :func:`cnnlab.core.significance.spread` (cnnlab.train.seeds.summary)
    note: str | None = None

    @property
    def config(self) -> TrainConfig:
        return self.members[0].config

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.members[0].epochs

    @property
    def train_seconds(self) -> float:
        return sum(m.train_seconds for m in self.members)

    def row(self) -> dict[str, Any]:
        first, mean = self.members[0].row(), {k: v["mean"] for k, v in self.spread.items()}
        speeds = [m.images_per_s for m in self.members if m.images_per_s is not None]
        return {**first, "run": self.name, "path": str(self.path),
                "train_error": None if mean["train_acc"] is None else 1 - mean["train_acc"],
                "train_acc": mean["train_acc"], "val_acc": mean["val_acc"], "test_acc": mean["test_acc"],
                "images_per_s": float(np.mean(speeds)) if speeds else None, "train_seconds": self.train_seconds,
                "group": True, "seeds": self.seeds, "spread": self.spread}


def _group(path: Path, name: str) -> Group:
    s = summary(path)
    done = [r for r in s["runs"] if r["status"] == "finished"]
    if not done:
        raise UserError(f"{path} is a group of seeds none of whose runs has finished; continue it with: "
                        f"cnnlab train --resume {path}")
    members = gather([r["path"] for r in done])
    for m, r in zip(members, done):
        m.name = f"{name}/seed-{r['seed']}"
    left = len(s["runs"]) - len(done)
    note = f"{left} of its {len(s['runs'])} runs have not finished; the figures are over the others" if left else None
    return Group(name, path, members, [r["seed"] for r in done], s["summary"], note)


def _read(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder (it does not exist or is a file); give folders that "
                        "cnnlab train wrote")
    _, epochs, _ = read_metrics(run_dir)
    try:
        info = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no config.json, so it is not a cnnlab run folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / 'config.json'}: {e}") from None
    return info, epochs


def gather(run_dirs: list[str | Path]) -> list[Compared | Group]:
    """The runs and groups of seeds to compare, in the order given."""
    if not run_dirs:
        raise UserError("give at least one run folder to compare")
    runs: list[Compared | Group] = []
    seen: dict[str, int] = {}
    for given in run_dirs:
        path = Path(given)
        name = path.resolve().name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} ({seen[name]})"
        if is_group(path):
            runs.append(_group(path, name))
            continue
        info, epochs = _read(path)
        try:
            cfg = from_saved(info.get("config", {}), check=False)
        except UserError as e:
            raise UserError(f"{path / 'config.json'} holds an invalid training configuration: {e}") from None
        params = macs = None
        note = None
        try:
            data = info.get("data", {})
            s = summarize(cfg.model, image_size=int(cfg.image_size), num_classes=len(data["classes"]),
                          width=cfg.width, in_channels=int((data.get("stored_size") or [3])[0]))
            params, macs = s["params"], s["macs"]
        except (KeyError, TypeError, ValueError) as e:  # UserError is a ValueError: an unknown or unbuildable model
            note = f"parameters and MACs not counted: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        runs.append(Compared(name, path, cfg, epochs, params, macs, note))
    return runs


def _correct(run: Compared) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Which of its test images ``run``'s best checkpoint gets right, the images themselves and its classes."""
    loaded = load(run.path)
    x, y = loaded.test_set()
    s = score(loaded.model, x, y, loaded.preprocess, tta=loaded.tta)
    return s.predictions == s.labels, torch.cat([x.flatten(1), y[:, None].to(x.dtype)], 1), loaded.classes


def differences(runs: list[Compared | Group]) -> list[dict[str, Any]]:
    """Whether each pair of ``runs`` differs: McNemar's exact test for two runs scored on the same test images
    (said so when their images differ), Welch's t-test on the test accuracies of two groups of seeds."""
    scored: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    found = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            pair: dict[str, Any] = {"a": a.name, "b": b.name}
            if isinstance(a, Group) and isinstance(b, Group):
                acc = [[m.last.get("test_acc") for m in g.members] for g in (a, b)]
                if any(len(v) < 2 or None in v for v in acc):
                    found.append({**pair, "test": None, "note": "a group needs two finished runs for Welch's test"})
                    continue
                found.append({**pair, **welch(*acc)})
            elif isinstance(a, Group) or isinstance(b, Group):
                found.append({**pair, "test": None, "note": "a run and a group: give the group's runs to test a pair"})
            else:
                for r in (a, b):
                    if id(r) not in scored:
                        scored[id(r)] = _correct(r)
                (ra, ia, ca), (rb, ib, cb) = scored[id(a)], scored[id(b)]
                if ca != cb or ia.shape != ib.shape or not torch.equal(ia, ib):
                    found.append({**pair, "test": None, "note": "scored on different test images: no paired test"})
                    continue
                found.append({**pair, **mcnemar(ra, rb)})
    return found


def _count(n: int | None, unit: str = "") -> str:
    if n is None:
        return "–"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n}{unit}"


COLUMNS = [("run", "run"), ("model", "model"), ("epochs", "epochs"), ("train_error", "train error"),
           ("val_acc", "val acc"), ("test_acc", "test acc"), ("params", "params"), ("macs", "MACs"),
           ("images_per_s", "images/s")]


def _cells(row: dict[str, Any]) -> list[str]:
    spread = row.get("spread") or {}

    def p(v: float | None, key: str = "") -> str:
        std = (spread.get(key) or {}).get("std")
        if v is None:
            return "–"
        return f"{100 * v:.2f} ± {100 * std:.2f}%" if std is not None else f"{100 * v:.2f}%"

    width = "" if row["width"] is None else f" w{row['width']}"
    run = row["run"] + (f" ({len(row['seeds'])} seeds)" if row.get("group") else "")
    return [run, f"{row['model']}{width}", str(row["epochs"]), p(row["train_error"], "train_acc"),
            p(row["val_acc"], "val_acc"), p(row["test_acc"], "test_acc"), _count(row["params"]), _count(row["macs"]),
            "–" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"]


def format_tests(found: list[dict[str, Any]]) -> str:
    """The pairwise tests of :func:`differences` as lines for the terminal."""
    lines = []
    for t in found:
        if t["test"] == "mcnemar":
            c = t["table"]
            what = (f"McNemar: {c['a_only']} images only {t['a']} gets right, {c['b_only']} only {t['b']}, "
                    f"{c['both_right']} both, {c['both_wrong']} neither; {t['verdict']}")
        elif t["test"] == "welch":
            what = f"Welch's t-test on test accuracy: difference {100 * t['difference']:+.2f} points; {t['verdict']}"
        else:
            what = t["note"]
        lines.append(f"{t['a']} vs {t['b']}: {what}")
    return "\n".join(lines)


def format_table(runs: list[Compared | Group]) -> str:
    """The comparison as a fixed-width table for the terminal."""
    header = [title for _, title in COLUMNS]
    rows = [_cells(r.row()) for r in runs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def members(runs: list[Compared | Group]) -> list[Compared]:
    """The runs, each group given as its members (whose curves are drawn)."""
    return [m for r in runs for m in (r.members if isinstance(r, Group) else [r])]


def curves(runs: list[Compared]) -> str:
    """Training error (dashed) and test error (solid) per epoch, one colour per run (He et al. 2015, Fig. 4, 6)."""
    with plain_text():
        fig = Figure(figsize=(11, 4.2))
        ax_err, ax_loss = fig.subplots(1, 2)
        for i, r in enumerate(runs):
            color = COLORS[i % len(COLORS)]
            x = [rec["epoch"] for rec in r.epochs]
            for key, style, what in (("train", "--", "train"), ("test", "-", "test")):
                acc = [rec.get(f"{key}_acc") for rec in r.epochs]
                if any(v is not None for v in acc):
                    ax_err.plot(x, [np.nan if v is None else 100 * (1 - v) for v in acc], ls=style, color=color,
                                lw=2.0 if key == "test" else 1.3, marker="o" if len(x) <= 30 else None, ms=3,
                                label=f"{r.name} ({what})")
                loss = [rec.get(f"{key}_loss") for rec in r.epochs]
                if any(v is not None for v in loss):
                    ax_loss.plot(x, [np.nan if v is None else v for v in loss], ls=style, color=color,
                                 lw=2.0 if key == "test" else 1.3)
        ax_err.set_title("error per epoch: dashed training error, solid test error", fontsize=10)
        ax_err.set_ylabel("error (%)")
        ax_loss.set_title("loss per epoch: dashed training, solid test (log scale)", fontsize=10)
        ax_loss.set_ylabel("cross-entropy loss")
        ax_loss.set_yscale("log")  # one diverging epoch would otherwise flatten every other curve
        for axis in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))  # plain numbers: the page draws text without TeX
        for ax in (ax_err, ax_loss):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax_err.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return _fig_uri(fig)


def _tests_section(found: list[dict[str, Any]]) -> str:
    if not found:
        return ""
    rows = []
    for t in found:
        if t["test"] == "mcnemar":
            c = t["table"]
            cells = [str(c[k]) for k in ("both_right", "a_only", "b_only", "both_wrong")]
            what, p = "McNemar's exact test", f"{t['p']:.4g}"
            said = t["verdict"]
        elif t["test"] == "welch":
            cells, what, p = ["–"] * 4, f"Welch's t-test ({100 * t['difference']:+.2f} points)", f"{t['p']:.4g}"
            said = t["verdict"]
        else:
            cells, what, p, said = ["–"] * 4, "none", "–", t["note"]
        numbers = "".join(f'<td class="num">{c}</td>' for c in cells)
        rows.append(f"<tr><td>{e(t['a'])}</td><td>{e(t['b'])}</td>{numbers}"
                    f'<td>{e(what)}</td><td class="num">{e(p)}</td><td>{e(said)}</td></tr>')
    return f"""<section id="differ"><h2>Do they differ?</h2>
<p>Two runs scored on the same test images: McNemar's exact test (a two-sided binomial test on the images only one
of them gets right), each run's best checkpoint scoring its test set. Two groups of seeds: Welch's t-test on their
final test accuracies. A difference is said to be significant when p &lt; 0.05.</p>
<table><thead><tr><th>A</th><th>B</th><th class="num">both right</th><th class="num">only A right</th>
<th class="num">only B right</th><th class="num">both wrong</th><th>test</th><th class="num">p</th><th>verdict</th>
</tr></thead><tbody>{''.join(rows)}</tbody></table>
</section>
"""


def page(runs: list[Compared | Group], found: list[dict[str, Any]] | None = None) -> str:
    """The comparison page (styled as the report)."""
    num = ' class="num"'
    head = "".join(f"<th{num if i > 1 else ''}>{e(t)}</th>" for i, (_, t) in enumerate(COLUMNS))
    body = ["<tr>" + "".join(f"<td{num if i > 1 else ''}>{e(c)}</td>" for i, c in enumerate(_cells(r.row())))
            + "</tr>" for r in runs]
    settings = []
    for r in runs:
        c = r.config
        optimisation = f"lr {c.lr}, {c.schedule} schedule, batch {c.batch_size}"
        if c.weights:
            optimisation += f", from {c.weights}"
        settings.append(
            f"<tr><td>{e(r.name)}</td><td>{e(c.dataset)}</td><td>{e(c.image_size)} px</td>"
            f"<td>{e(c.recipe)}</td><td>{e(optimisation)}</td>"
            f"<td>{e(' '.join(map(str, r.seeds)) if isinstance(r, Group) else c.seed)}</td>"
            f"<td{num}>{r.train_seconds:.0f} s</td><td>{e(r.path)}</td></tr>")
    notes = "".join(f'<p class="note">{e(r.name)}: {e(r.note)}</p>' for r in runs if r.note)
    names = ", ".join(r.name for r in runs)
    return document_head(f"cnnlab compare: {names}", f"<style>{CSS}</style>", CSP) + f"""<body>
<header>
<h1>cnnlab compare</h1>
<p class="sub">{len(runs)} runs · written {datetime.now():%Y-%m-%d %H:%M}</p>
</header>
<main>
<section id="curves"><h2>Training and test error</h2>
<p>As He et al. (2015) draw their Fig. 4 and Fig. 6: per epoch, the training error (dashed; the running
mean over the epoch's batches, augmented as in training) and the test error (solid), one colour per run.</p>
<img class="plot" src="{curves(members(runs))}" alt="training and test error per epoch of {e(names)}">
</section>
<section id="table"><h2>Final figures</h2>
<p>After each run's last epoch. Parameters and multiply-accumulates are counted on the model at the run's input
size (as <code>cnnlab summary</code> counts them); images/s is the mean training speed after the first epoch.</p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}
<p>A group of seeds is one row: the mean ± sample standard deviation over its finished runs.</p>
</section>
{_tests_section(found or [])}<section id="settings"><h2>Settings</h2>
<table><thead><tr><th>run</th><th>dataset</th><th>input</th><th>recipe</th><th>optimisation</th><th>seed</th>
<th class="num">training time</th><th>folder</th></tr></thead><tbody>{''.join(settings)}</tbody></table>
</section>
</main>
""" + document_end()


def compare(run_dirs: list[str | Path], out: str | Path | None = None
            ) -> tuple[Path, list[Compared | Group], list[dict[str, Any]]]:
    """Write the comparison page of ``run_dirs`` (runs and groups of seeds) to ``out`` (default
    ``compare.html``); returns its path, the runs (``row()`` gives each one's figures) and the pairwise
    tests of :func:`differences`."""
    target = Path(out) if out else Path("compare.html")
    if target.is_dir():
        raise UserError(f"`out` {target} is a folder; give a file name such as {target / 'compare.html'}")
    runs = gather(list(run_dirs))
    found = differences(runs)
    try:
        atomic_write(target, page(runs, found))
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    return target, runs, found
