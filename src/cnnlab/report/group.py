"""``cnnlab report GROUP``: the page of a group of seeds (``cnnlab train --seeds``).

Each seed's final figures, their mean ± sample standard deviation, 95% interval (Student's t over the
seeds) and min–max, and the runs' curves overlaid; each run's own report is ``cnnlab report GROUP/seed-S``.
One self-contained HTML file, styled as the report.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab.report.compare import Group, curves, gather
from cnnlab.report.page import CSP, CSS, document_end, document_head, e
from cnnlab.train.seeds import FIGURES, summary

__all__ = ["group_page"]


def _figure(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f} s" if key == "seconds" else f"{100 * v:.2f}%" if key.endswith("_acc") else f"{v:.4f}"


def _per_seed(s: dict[str, Any]) -> str:
    head = "".join(f'<th class="num">{e(k)}</th>' for k in FIGURES)
    rows = "".join(f"<tr><td>{r['seed']}</td><td>{e(r['status'])}</td><td class=\"num\">{e(r['epochs'])}</td>"
                   + "".join(f'<td class="num">{_figure(k, r.get(k))}</td>' for k in FIGURES)
                   + f"<td>{e(r['path'])}</td></tr>" for r in s["runs"])
    return (f'<table><thead><tr><th>seed</th><th>status</th><th class="num">epochs</th>{head}<th>folder</th>'
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _spread(s: dict[str, Any]) -> str:
    rows = []
    for key, f in s["summary"].items():
        if not f["n"]:
            continue
        ci = "–" if f["ci95"] is None else f"{_figure(key, f['ci95'][0])} – {_figure(key, f['ci95'][1])}"
        rows.append(f'<tr><td>{e(key)}</td><td class="num">{_figure(key, f["mean"])}</td>'
                    f'<td class="num">{_figure(key, f["std"])}</td><td class="num">{ci}</td>'
                    f'<td class="num">{_figure(key, f["min"])} – {_figure(key, f["max"])}</td>'
                    f'<td class="num">{f["n"]}</td></tr>')
    return ('<table><thead><tr><th>figure</th><th class="num">mean</th><th class="num">std</th>'
            '<th class="num">95% interval</th><th class="num">min – max</th><th class="num">runs</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def group_page(group_dir: str | Path) -> str:
    """The page of the group of seeds in ``group_dir``."""
    group_dir = Path(group_dir)
    s = summary(group_dir)
    (group,) = gather([group_dir])
    assert isinstance(group, Group)
    name = group_dir.resolve().name
    note = f'<p class="note">{e(group.note)}</p>' if group.note else ""
    return document_head(f"cnnlab report: {name}", f"<style>{CSS}</style>", CSP) + f"""<body>
<header>
<h1>{e(name)}</h1>
<p class="sub">a group of {len(s['runs'])} seeds ({e(' '.join(map(str, s['seeds'])))}) · {e(group.config.model)} on
{e(group.config.dataset)} · written {datetime.now():%Y-%m-%d %H:%M}</p>
</header>
<main>
<section id="summary"><h2>Over the seeds</h2>
<p>The final figures (the last epoch's; time summed over the epochs) of the finished runs: mean, sample standard
deviation (n − 1), the 95% interval of the mean (Student's t over the seeds) and the range.</p>
{_spread(s)}{note}
</section>
<section id="seeds"><h2>Each seed</h2>
<p>Each is an ordinary run folder: <code>cnnlab report</code>, <code>evaluate</code> and the others take it.</p>
{_per_seed(s)}
</section>
<section id="curves"><h2>Training and test error</h2>
<p>Per epoch, each seed's training error (dashed) and test error (solid), overlaid.</p>
<img class="plot" src="{curves(group.members)}" alt="training and test error per epoch of each seed of {e(name)}">
</section>
</main>
""" + document_end()
