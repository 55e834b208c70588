"""Statistics of the evaluation: a vectorised bootstrap, the exact McNemar test, the three-way verdict.

The bootstrap draws one (resamples x rows) index matrix and computes every metric for all
resamples at once from per-class TP/FP/FN counts: no scikit-learn call per resample, so a
thousand resamples of a few thousand rows take milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

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
    from scipy.stats import binomtest  # seconds to import: only where a test is run

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


SEED_RULE = ("one seed: the paired test's verdict. Several: positive only if the base seed's paired test is "
             "significant and better AND the bootstrap over seeds and test rows (one seed drawn per resample) keeps "
             "the margin's interval above 0; negative likewise below 0; otherwise no_gain")


def verdict_over_seeds(
    y_true: np.ndarray, proposed_by_seed: Mapping[int, np.ndarray], baselines: Mapping[str, np.ndarray],
    resamples: np.ndarray, *, base_seed: int, confidence: float, alpha: float, seed: int = 0,
) -> dict:
    """`transfer_verdict` of the base seed's predictions, then the verdict that accounts for the
    other seeds (SEED_RULE). Each resample pairs the test rows it draws with one seed drawn at
    random, so the interval holds both the test-set noise and the seed-to-seed spread: it asks
    whether another seed would also win, not only whether the mean seed does. With one seed the
    verdict is the paired test's, unchanged. Returns transfer_verdict's keys (`verdict` final,
    `base_seed_verdict` the paired test's) plus `seeds`: per seed accuracy, margin, p-value and
    the spread (mean, sd, min, max)."""
    if base_seed not in proposed_by_seed:
        raise ValueError(f"no predictions of the base seed {base_seed}")
    y_true = np.asarray(y_true)
    base = transfer_verdict(y_true, proposed_by_seed[base_seed], baselines, resamples, confidence=confidence, alpha=alpha)
    order = [base_seed, *sorted(s for s in proposed_by_seed if s != base_seed)]
    right_b = np.asarray(baselines[base["best_baseline"]]) == y_true
    per_seed, diffs = {}, []
    for s in order:
        right = np.asarray(proposed_by_seed[s]) == y_true
        diffs.append(right.astype(float) - right_b.astype(float))
        test = mcnemar_exact(right, right_b)
        margin = float(diffs[-1].mean())
        significant = test["p_value"] < alpha and margin != 0
        per_seed[str(s)] = {"accuracy": float(right.mean()), "margin_points": 100 * margin,
                            "p_value": test["p_value"], "significant": bool(significant),
                            "verdict": "no_gain" if not significant else "positive" if margin > 0 else "negative"}
    accuracy = np.array([per_seed[str(s)]["accuracy"] for s in order])
    drawn = np.random.default_rng(seed).integers(0, len(order), size=resamples.shape[0])
    low, high = interval(np.stack(diffs)[drawn[:, None], resamples].mean(1), confidence)
    final = base["verdict"]
    if len(order) > 1:
        final = ("positive" if final == "positive" and low > 0 else
                 "negative" if final == "negative" and high < 0 else "no_gain")
    seeds = {"seeds": order, "n": len(order), "base_seed": base_seed, "per_seed": per_seed,
             "accuracy_mean": float(accuracy.mean()), "accuracy_sd": float(accuracy.std(ddof=1)) if len(order) > 1 else None,
             "accuracy_min": float(accuracy.min()), "accuracy_max": float(accuracy.max()),
             "margin_ci": [low, high], "rule": SEED_RULE}
    return {**base, "base_seed_verdict": base["verdict"], "verdict": final, "negative_transfer": final == "negative",
            "seeds": seeds}


def verdict_sentence(verdict: Mapping, proposed: str = "finetune") -> str:
    """The verdict in words, for the closing line and the report."""
    low, high = (100 * x for x in verdict["margin_ci"])
    detail = (f"{verdict['margin_points']:+.2f} points accuracy over {verdict['best_baseline']} "
              f"[{low:+.2f}, {high:+.2f}], McNemar p={verdict['test']['p_value']:.3g}")
    seeds = verdict.get("seeds") or {}
    if seeds.get("n", 1) > 1:
        s_low, s_high = (100 * x for x in seeds["margin_ci"])
        detail += (f"; over {seeds['n']} seeds test accuracy {seeds['accuracy_mean']:.4f} "
                   f"[{seeds['accuracy_min']:.4f}, {seeds['accuracy_max']:.4f}], margin [{s_low:+.2f}, {s_high:+.2f}]")
        if verdict.get("base_seed_verdict") != verdict["verdict"]:
            detail += f", the base seed alone: {verdict['base_seed_verdict']}"
    words = {
        "positive": f"Transfer paid off: {proposed} beats the best baseline ({detail}).",
        "no_gain": f"No gain from transfer: {proposed} is not significantly different from the best baseline ({detail}).",
        "negative": f"Negative transfer: the best baseline is significantly better than {proposed} ({detail}).",
    }
    return words[verdict["verdict"]]
