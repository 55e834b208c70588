"""Statistics of the evaluation: a vectorised bootstrap, the exact McNemar test, the three-way verdict.

The bootstrap draws one (resamples x rows) index matrix and computes every metric for all
resamples at once from per-class TP/FP/FN counts: no scikit-learn call per resample, so a
thousand resamples of a few thousand rows take milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import binomtest

VERDICTS = ("positive", "no_gain", "negative")


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """A (samples, n) matrix of row indices drawn with replacement; one row per resample."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def interval(values: np.ndarray, confidence: float) -> list[float]:
    """Percentile interval of bootstrap values."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def macro_f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Macro-F1 over the last axis (classes), averaged over the classes present in truth or
    prediction (scikit-learn's default label set), with 0 for a present class never got right."""
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape, dtype=float), where=present)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def class_counts(y_true: np.ndarray, y_pred: np.ndarray, resamples: np.ndarray, n_classes: int) -> tuple:
    """Per-class TP, FP, FN of every resample, each (samples, n_classes), from one gather."""
    t, p = np.asarray(y_true)[resamples], np.asarray(y_pred)[resamples]
    hit = t == p
    # bincount over (resample, class) pairs counts every resample in one call
    offsets = (np.arange(resamples.shape[0]) * n_classes)[:, None]
    size = resamples.shape[0] * n_classes
    tp = np.bincount((offsets + p)[hit], minlength=size).reshape(-1, n_classes)
    predicted = np.bincount((offsets + p).ravel(), minlength=size).reshape(-1, n_classes)
    actual = np.bincount((offsets + t).ravel(), minlength=size).reshape(-1, n_classes)
    return tp, predicted - tp, actual - tp


def point_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy and macro-F1 of one set of predictions (same definitions as the bootstrap)."""
    whole = np.arange(len(y_true))[None, :]
    tp, fp, fn = class_counts(y_true, y_pred, whole, n_classes)
    return {"accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
            "macro_f1": float(macro_f1_from_counts(tp, fp, fn)[0]), "n": int(len(y_true))}


def bootstrap_scores(y_true: np.ndarray, y_pred: np.ndarray, resamples: np.ndarray, n_classes: int) -> dict:
    """Accuracy and macro-F1 of every resample, as arrays of length `samples`."""
    tp, fp, fn = class_counts(y_true, y_pred, resamples, n_classes)
    return {"accuracy": tp.sum(1) / resamples.shape[1], "macro_f1": macro_f1_from_counts(tp, fp, fn)}


def with_intervals(y_true: np.ndarray, y_pred: np.ndarray, resamples: np.ndarray, confidence: float,
                   n_classes: int) -> dict:
    """Point metrics plus percentile-bootstrap intervals over test rows."""
    out = point_scores(y_true, y_pred, n_classes)
    boot = bootstrap_scores(y_true, y_pred, resamples, n_classes)
    out["accuracy_ci"] = interval(boot["accuracy"], confidence)
    out["macro_f1_ci"] = interval(boot["macro_f1"], confidence)
    return out


def mcnemar_exact(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Exact McNemar: of the rows where exactly one model is right, is the split 50/50?"""
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p_value = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"name": "exact McNemar (two-sided) on paired test predictions", "p_value": p_value,
            "only_transferred_right": only_a, "only_baseline_right": only_b}


def transfer_verdict(
    y_true: np.ndarray, proposed: np.ndarray, baselines: Mapping[str, np.ndarray], resamples: np.ndarray, *,
    confidence: float, alpha: float,
) -> dict:
    """Does the transferred model beat the best baseline, lose to it, or neither, beyond noise?

    `positive`: better and the paired test is significant at `alpha`; `negative`: the best baseline
    is significantly better; `no_gain`: the difference is not significant. The margin (accuracy,
    in points) and its paired-bootstrap interval are reported beside the test.
    """
    if not baselines:
        raise ValueError("transfer_verdict needs at least one baseline")
    y_true = np.asarray(y_true)
    accuracy = {name: float(np.mean(pred == y_true)) for name, pred in baselines.items()}
    best = max(accuracy, key=lambda name: (accuracy[name], name))
    right_p, right_b = np.asarray(proposed) == y_true, np.asarray(baselines[best]) == y_true
    diff = right_p.astype(float) - right_b.astype(float)
    diffs = diff[resamples].mean(1)
    test = mcnemar_exact(right_p, right_b)
    margin = float(diff.mean())
    significant = test["p_value"] < alpha
    verdict = "no_gain" if not significant or margin == 0 else ("positive" if margin > 0 else "negative")
    return {
        "best_baseline": best,
        "margin": margin,
        "margin_points": 100 * margin,
        "margin_ci": interval(diffs, confidence),
        "alpha": alpha,
        "significant": bool(significant and margin != 0),
        "verdict": verdict,
        "negative_transfer": verdict == "negative",
        "test": test,
    }


def verdict_sentence(verdict: Mapping, proposed: str = "finetune") -> str:
    """The verdict in words, for the closing line and the report."""
    low, high = (100 * x for x in verdict["margin_ci"])
    detail = (f"{verdict['margin_points']:+.2f} points accuracy over {verdict['best_baseline']} "
              f"[{low:+.2f}, {high:+.2f}], McNemar p={verdict['test']['p_value']:.3g}")
    words = {
        "positive": f"Transfer paid off: {proposed} beats the best baseline ({detail}).",
        "no_gain": f"No gain from transfer: {proposed} is not significantly different from the best baseline ({detail}).",
        "negative": f"Negative transfer: the best baseline is significantly better than {proposed} ({detail}).",
    }
    return words[verdict["verdict"]]
