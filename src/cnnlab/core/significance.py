"""Whether a difference is larger than the noise: the spread of repeated runs and tests between two models.

``spread`` is the mean ± sample standard deviation and Student's t interval of figures repeated over seeds;
``mcnemar`` is McNemar's exact test on two models' right/wrong answers to the same images (paired, so it
sees far smaller differences than two accuracies' intervals do); ``welch`` is Welch's t-test between two
groups of seeds. ``verdict`` says the outcome in words.
"""

from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Any

import torch
from scipy import stats

LEVEL = 0.05  # the significance level the verdicts use


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1), min, max and the 95% interval of the mean (Student's t
    over the n values) of ``values``; the deviation and interval are None for a single value."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = fmean(values)
    std = stdev(values) if n > 1 else None
    ci = None
    if std is not None:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "ci95": ci}


def verdict(p: float) -> str:
    """``p`` in plain words at the 5% level."""
    if p < LEVEL:
        return f"significant at 5%: p = {p:.3g}"
    return f"not significant at 5%: p = {p:.3g}; the difference is within the noise"


def mcnemar(a_right: torch.Tensor, b_right: torch.Tensor) -> dict[str, Any]:
    """McNemar's exact test of two models' per-image correctness (booleans over the same images): the
    table of right/wrong pairs and the two-sided binomial p-value of the discordant pairs (``a_only``,
    ``b_only``: the images only one of them gets right), 1 when there are none."""
    a, b = a_right.bool(), b_right.bool()
    if a.shape != b.shape:
        raise ValueError(f"McNemar's test pairs the same images; got {tuple(a.shape)} and {tuple(b.shape)}")
    table = {"both_right": int((a & b).sum()), "a_only": int((a & ~b).sum()), "b_only": int((~a & b).sum()),
             "both_wrong": int((~a & ~b).sum())}
    discordant = table["a_only"] + table["b_only"]
    p = float(stats.binomtest(table["a_only"], discordant, 0.5).pvalue) if discordant else 1.0
    return {"test": "mcnemar", "table": table, "p": min(p, 1.0), "verdict": verdict(min(p, 1.0))}


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's two-sided t-test between two groups' figures (at least two values each): the difference
    of the means and its p-value."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values on each side")
    difference = fmean(a) - fmean(b)
    if stdev(a) == 0 and stdev(b) == 0:
        p = 1.0 if difference == 0 else 0.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"test": "welch", "difference": difference, "p": p, "verdict": verdict(p)}
