"""Transferability scores against their definitions, on random and planted data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from graft.transferability import (
    freeze_depth,
    hscore,
    knn_accuracy,
    logme,
    rank_candidates,
    score_layers,
)

# LogME's fixed point against a direct maximisation: per-sample log evidence, absolute
LOGME_TOLERANCE = 1e-4


def direct_log_evidence(features: np.ndarray, labels: np.ndarray) -> float:
    """max over alpha, beta of log N(y; 0, I/beta + F F^T/alpha) per sample, averaged over the
    classes' indicator vectors: the evidence LogME maximises, computed with no SVD tricks."""
    f = features.astype(np.float64)
    n = len(f)
    gram = f @ f.T
    values = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)

        def negative(log_ab, y=y):
            alpha, beta = np.exp(log_ab)
            cov = np.eye(n) / beta + gram / alpha
            _, logdet = np.linalg.slogdet(cov)
            return 0.5 * (logdet + y @ np.linalg.solve(cov, y) + n * np.log(2 * np.pi))

        best = min((minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                                               "maxiter": 4000})
                    for start in ([0.0, 0.0], [3.0, 1.0], [-2.0, 2.0])), key=lambda r: r.fun)
        values.append(-best.fun / n)
    return float(np.mean(values))


@pytest.mark.parametrize("n,d", [(60, 8), (40, 50)])
def test_logme_matches_a_direct_evidence_maximisation(n, d):
    rng = np.random.default_rng(n + d)
    # labels that depend on the features (plus noise): the evidence has an interior maximum.
    # (With labels independent of the features it grows towards alpha -> infinity, w = 0, where
    # LogME's 1e-5 in the update's denominator stops it.)
    features = rng.normal(size=(n, d))
    labels = np.argmax(features @ rng.normal(size=(d, 3)) + rng.normal(size=(n, 3)), axis=1)
    assert logme(features, labels) == pytest.approx(direct_log_evidence(features, labels), abs=LOGME_TOLERANCE)


def ledoit_wolf(f: np.ndarray) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity of centred rows `f`, written out."""
    n, d = f.shape
    cov = f.T @ f / n
    mu = np.trace(cov) / d
    delta = np.sum((cov - mu * np.eye(d)) ** 2)
    beta = min(sum(np.sum((np.outer(x, x) - cov) ** 2) for x in f) / n**2, delta)
    return beta / delta


@pytest.mark.parametrize("n,d", [(80, 6), (40, 60)])
def test_hscore_matches_its_formula(n, d):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(n, d))
    labels = rng.integers(0, 4, size=n)
    f = features - features.mean(axis=0)
    cov_f = np.cov(f, rowvar=False, bias=True)
    means = np.stack([f[labels == c].mean(axis=0) for c in labels])  # E[f | y] of each row
    cov_g = np.cov(means, rowvar=False, bias=True)
    a = ledoit_wolf(f)
    shrunk = (1 - a) * cov_f + a * np.trace(cov_f) / d * np.eye(d)
    expected = np.trace(np.linalg.inv(shrunk) @ ((1 - a) * cov_g))
    assert hscore(features, labels) == pytest.approx(expected, rel=1e-9)


def test_hscore_with_more_dimensions_than_rows_still_tells_signal_from_noise():
    # the plain H-score's pseudo-inverse gives classes - 1 = 2.0 for both (every layer tied)
    rng = np.random.default_rng(4)
    labels = np.arange(60) % 3
    noise = rng.normal(size=(60, 200))
    signal = noise.copy()
    signal[:, :3] += 3.0 * np.eye(3)[labels]
    assert hscore(signal, labels) > 2 * hscore(noise, labels)
    assert hscore(noise, labels) < 1.9


def planted_layers(rng, informative: int, layers: int = 4, n: int = 120, d: int = 12):
    """(layers + 1, n, d) features where only layer `informative` carries the label."""
    labels = np.arange(n) % 3
    stack = rng.normal(size=(layers + 1, n, d))
    stack[informative, :, :3] += 4.0 * np.eye(3)[labels]
    return stack, labels


def test_features_that_determine_the_label_score_higher_than_noise():
    rng = np.random.default_rng(2)
    stack, labels = planted_layers(rng, informative=1, layers=1)
    signal, noise = stack[1], stack[0]
    assert logme(signal, labels) > logme(noise, labels) + 0.1
    assert hscore(signal, labels) > hscore(noise, labels) + 0.5
    assert knn_accuracy(signal[:60], labels[:60], signal[60:], labels[60:]) > 0.9
    assert knn_accuracy(noise[:60], labels[:60], noise[60:], labels[60:]) < 0.7


@pytest.mark.parametrize("informative,expected", [(2, 2), (1, 1), (0, 0), (4, 3)])
def test_freeze_auto_freezes_up_to_the_informative_layer_and_keeps_the_top_block_trainable(informative, expected):
    rng = np.random.default_rng(informative)
    stack, labels = planted_layers(rng, informative=informative)
    scores = score_layers(stack[:, :80], labels[:80], stack[:, 80:], labels[80:])
    assert set(scores) == {"0", "1", "2", "3", "4", "average"}
    assert all(s["seconds"] >= 0 for layer in scores.values() for s in layer.values())
    assert freeze_depth(scores) == expected


def test_candidates_rank_by_logme_on_the_layer_average():
    rng = np.random.default_rng(3)
    good, labels = planted_layers(rng, informative=2)
    bad = rng.normal(size=good.shape)
    scores = {name: score_layers(s[:, :80], labels[:80], s[:, 80:], labels[80:]) for name, s in
              (("noise", bad), ("planted", good))}
    assert rank_candidates(scores) == ["planted", "noise"]
