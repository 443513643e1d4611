"""Metrics against numpy / scipy."""
import numpy as np
import pytest
from scipy import stats

from adaptune.experiments.multitask.metrics import accuracy, f1, matthews, pearson

rng = np.random.default_rng(0)


def test_pearson_matches_scipy():
    for _ in range(5):
        x, y = rng.normal(size=40), rng.normal(size=40)
        y = 0.5 * x + y
        assert pearson(x.tolist(), y.tolist()) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == 0.0  # undefined -> 0


def test_accuracy_matches_numpy():
    p, g = rng.integers(0, 5, 100), rng.integers(0, 5, 100)
    assert accuracy(p.tolist(), g.tolist()) == pytest.approx(float(np.mean(p == g)))


def test_matthews_is_pearson_of_binary_labels():
    p, g = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    g[:80] = p[:80]
    assert matthews(p.tolist(), g.tolist()) == pytest.approx(np.corrcoef(p, g)[0, 1], abs=1e-12)
    assert matthews([1, 1], [1, 0]) == 0.0


def test_f1_matches_counts():
    p, g = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp = np.sum((p == 1) & (g == 1))
    precision, recall = tp / np.sum(p == 1), tp / np.sum(g == 1)
    assert f1(p.tolist(), g.tolist()) == pytest.approx(2 * precision * recall / (precision + recall))


def test_lengths_must_match():
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError):
        pearson([], [])


def test_spearman_matches_scipy_with_ties():
    from adaptune.experiments.multitask.metrics import spearman
    for _ in range(5):
        x = rng.integers(0, 6, 60).astype(float)  # many ties
        y = x + rng.normal(size=60)
        assert spearman(x.tolist(), y.tolist()) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman([2.0, 2.0], [0.0, 1.0]) == 0.0  # constant side: undefined -> 0
