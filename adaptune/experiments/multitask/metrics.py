"""Dev metrics in plain Python: accuracy, Pearson r, Spearman rho, Matthews correlation, binary F1.

The tests check each against numpy / scipy / their textbook definitions."""
from __future__ import annotations

import math
from typing import Sequence


def accuracy(pred: Sequence[float], gold: Sequence[float]) -> float:
    _same_length(pred, gold)
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (r undefined)."""
    _same_length(pred, gold)
    n = len(gold)
    mp, mg = sum(pred) / n, sum(gold) / n
    cov = sum((p - mp) * (g - mg) for p, g in zip(pred, gold))
    vp = sum((p - mp) ** 2 for p in pred)
    vg = sum((g - mg) ** 2 for g in gold)
    if vp == 0 or vg == 0:
        return 0.0
    return cov / math.sqrt(vp * vg)


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the ranks; 0.0 when either side is constant."""
    _same_length(pred, gold)
    return pearson(_ranks(pred), _ranks(gold))


def _confusion(pred: Sequence[float], gold: Sequence[float]) -> tuple[int, int, int, int]:
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    tn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 0)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    return tp, tn, fp, fn


def matthews(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Matthews correlation of binary labels (CoLA's metric); 0.0 when undefined."""
    _same_length(pred, gold)
    tp, tn, fp, fn = _confusion(pred, gold)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def f1(pred: Sequence[float], gold: Sequence[float]) -> float:
    """F1 of the positive class (label 1); 0.0 when there are no positives predicted or gold."""
    _same_length(pred, gold)
    tp, _, fp, fn = _confusion(pred, gold)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


METRICS = {"accuracy": accuracy, "pearson": pearson, "spearman": spearman, "matthews": matthews, "f1": f1}


def _same_length(pred: Sequence[float], gold: Sequence[float]) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"metrics need equal, non-empty prediction and label lists; got {len(pred)} and {len(gold)}")
