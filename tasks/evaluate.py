"""evaluate: test metrics of every candidate, the negative-transfer verdict, the gate, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd  # noqa: E402
from scipy.stats import binomtest  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score  # noqa: E402

from graft import config  # noqa: E402
from graft.baselines import load_tfidf  # noqa: E402
from graft.errors import exits_cleanly  # noqa: E402
from graft.files import atomic_path, write_json  # noqa: E402
from graft.layout import Layout  # noqa: E402
from graft.modeling import load_classifier, load_tokenizer, predict_proba, select_device  # noqa: E402

_LAYOUT = Layout()
PRETRAINED_DIR = _LAYOUT.pretrained_dir
PREPARED_DIR = _LAYOUT.prepared_dir
FINETUNED_DIR = _LAYOUT.finetuned_dir
BASELINES_DIR = _LAYOUT.baselines_dir


def load_split(name: str, prepared_dir: Path = PREPARED_DIR) -> pd.DataFrame:
    return pd.read_parquet(prepared_dir / f"{name}.parquet")


REPORTS = Path("reports")
PLOTS = REPORTS / "plots"
PROPOSED = "finetune"
BASELINES = ("scratch", "tfidf")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": int(len(y_true)),
    }


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def interval(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def with_intervals(y_true: np.ndarray, y_pred: np.ndarray, resamples: np.ndarray, confidence: float) -> dict:
    """Point metrics plus percentile-bootstrap confidence intervals over test rows."""
    out = scores(y_true, y_pred)
    acc = np.array([accuracy_score(y_true[i], y_pred[i]) for i in resamples])
    f1 = np.array([f1_score(y_true[i], y_pred[i], average="macro", zero_division=0) for i in resamples])
    out["accuracy_ci"] = interval(acc, confidence)
    out["macro_f1_ci"] = interval(f1, confidence)
    return out


def transfer_verdict(
    y_true: np.ndarray, proposed: np.ndarray, baselines: dict[str, np.ndarray], resamples: np.ndarray, confidence: float
) -> dict:
    """Does the transferred model beat the best baseline? Margin, paired-bootstrap CI, McNemar test."""
    accuracy = {name: float(accuracy_score(y_true, pred)) for name, pred in baselines.items()}
    best = max(accuracy, key=lambda name: (accuracy[name], name))
    right_p, right_b = proposed == y_true, baselines[best] == y_true
    diffs = np.array([right_p[i].mean() - right_b[i].mean() for i in resamples])
    only_p, only_b = int((right_p & ~right_b).sum()), int((~right_p & right_b).sum())
    # exact McNemar: of the rows where exactly one model is right, is the split 50/50?
    p_value = float(binomtest(only_p, only_p + only_b, 0.5).pvalue) if only_p + only_b else 1.0
    margin = float(right_p.mean() - right_b.mean())
    return {
        "best_baseline": best,
        "margin": margin,
        "margin_ci": interval(diffs, confidence),
        "negative_transfer": margin <= 0,
        "significant": bool(p_value < 1 - confidence and margin > 0),
        "test": {"name": "exact McNemar (two-sided) on paired test predictions", "p_value": p_value,
                 "only_transferred_right": only_p, "only_baseline_right": only_b},
    }


def gate(params: config.GateParams, metrics: dict, verdict: dict) -> dict:
    checks = [
        {"name": "min_accuracy", "value": metrics["accuracy"], "threshold": params.min_accuracy,
         "passed": metrics["accuracy"] >= params.min_accuracy},
        {"name": "min_macro_f1", "value": metrics["macro_f1"], "threshold": params.min_macro_f1,
         "passed": metrics["macro_f1"] >= params.min_macro_f1},
    ]
    if params.require_positive_transfer:
        checks.append({"name": "positive_transfer", "value": verdict["margin"], "threshold": 0.0,
                       "passed": not verdict["negative_transfer"]})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def predict_all(params: config.Params, texts: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
    """Predicted class ids of every candidate on every split given."""
    device = select_device()
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, model_dir in ((PROPOSED, FINETUNED_DIR), ("scratch", BASELINES_DIR / "scratch")):
        tokenizer = load_tokenizer(model_dir)
        model = load_classifier(model_dir)
        out[name] = {
            split: predict_proba(model, tokenizer, split_texts, max_length=params.model.max_length,
                                 batch_size=params.features.batch_size, device=device,
                                 desc=f"{name} {split}").argmax(1)
            for split, split_texts in texts.items()
        }
    tfidf = load_tfidf(BASELINES_DIR / "tfidf")
    out["tfidf"] = {split: tfidf(split_texts).argmax(1) for split, split_texts in texts.items()}
    return out


def evaluate(params: config.Params) -> dict:
    """Write reports/{metrics,transfer,gate}.json and the confusion-matrix plot; return the gate."""
    splits = {name: load_split(name, PREPARED_DIR) for name in ("val", "test")}
    classes = json.loads((PREPARED_DIR / "datacard.json").read_text())["classes"]
    truth = {name: frame["label_id"].to_numpy() for name, frame in splits.items()}
    predictions = predict_all(params, {name: frame["text"].tolist() for name, frame in splits.items()})

    e = params.evaluate
    resamples = bootstrap_indices(len(truth["test"]), e.bootstrap_samples, params.seed)
    candidates = {
        name: {"role": "transferred" if name == PROPOSED else "baseline",
               "test": with_intervals(truth["test"], pred["test"], resamples, e.confidence),
               "val": scores(truth["val"], pred["val"])}
        for name, pred in predictions.items()
    }
    verdict = transfer_verdict(
        truth["test"], predictions[PROPOSED]["test"], {b: predictions[b]["test"] for b in BASELINES},
        resamples, e.confidence,
    )
    metrics = {split: {**scores(truth[split], predictions[PROPOSED][split]),
                       "per_class_f1": dict(zip(classes, f1_score(truth[split], predictions[PROPOSED][split],
                                                                  average=None, labels=range(len(classes)),
                                                                  zero_division=0).tolist(), strict=True))}
               for split in ("test", "val")}
    metrics["model"] = PROPOSED
    result_gate = gate(params.gate, metrics["test"], verdict)

    write_json(REPORTS / "metrics.json", metrics)
    write_json(REPORTS / "transfer.json", {"proposed": PROPOSED, "candidates": candidates,
                                           "confidence": e.confidence, **verdict})
    write_json(REPORTS / "gate.json", result_gate)
    plot_confusion(truth["test"], predictions[PROPOSED]["test"], classes, PLOTS / "confusion_matrix.png",
                   f"{PROPOSED}: test accuracy {metrics['test']['accuracy']:.3f}")
    return {"metrics": metrics, "verdict": verdict, "gate": result_gate, "candidates": candidates}


@exits_cleanly
def main() -> None:
    result = evaluate(config.load())
    for name, cand in result["candidates"].items():
        t = cand["test"]
        low, high = t["accuracy_ci"]
        print(f"evaluate: {name:8s} test accuracy {t['accuracy']:.4f} [{low:.4f}, {high:.4f}], macro-F1 {t['macro_f1']:.4f}")  # noqa: T201
    v = result["verdict"]
    low, high = v["margin_ci"]
    print(  # noqa: T201
        f"evaluate: margin over {v['best_baseline']} {v['margin']:+.4f} [{low:+.4f}, {high:+.4f}], "
        f"McNemar p={v['test']['p_value']:.3f}, "
        f"negative_transfer={v['negative_transfer']}, gate passed={result['gate']['passed']}"
    )


if __name__ == "__main__":
    main()
