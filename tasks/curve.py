"""curve: test accuracy against training labels per class (the data-efficiency curve).

Subsets are nested and stratified: per seed, each class's train rows are shuffled once and a
size-k subset takes the first k rows of every class, so each subset contains every smaller one
of the same seed. The linear probe (on the features stage's cached embeddings) and TF-IDF (on
the raw text) run at every size, with no backbone forward pass; `partial` fine-tuning runs only
at `curve.finetune_sizes` (one seed each). A point's interval resamples seeds and test rows
together. The curve depends on prepare, fetch and features only, not on train.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_write_bytes, write_json
from graft.layout import Layout, require
from graft.lengths import resolved_tokenization
from graft.stats import interval

TRANSFER = ("linear_probe", "partial")
BASELINES = ("tfidf",)
ALL = "all"


def nested_subsets(labels: np.ndarray, sizes: list[int], seed: int) -> dict[int, np.ndarray]:
    """Row indices of a stratified subset per size (labels per class), each inside the next."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return {k: np.sort(np.concatenate([order[:k] for order in orders])) for k in sizes}


def point_interval(right: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, list[float], np.ndarray]:
    """Accuracy of a (seeds, test rows) matrix of hits: the mean, and a bootstrap that draws a seed
    and a resample of test rows together (returns the replicates too, for labels-needed)."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, right.shape[0], size=samples)
    rows = rng.integers(0, right.shape[1], size=(samples, right.shape[1]))
    replicates = right[seeds[:, None], rows].mean(1)
    return float(right.mean()), interval(replicates, confidence), replicates


def catch_up_size(sizes: list, transfer_ci: list[list[float]], baseline_ci: list[list[float]]) -> object | None:
    """The smallest size from which on the baseline's interval reaches the transfer's at every
    larger size (overlap, or the baseline above); None when it has not caught up at the last size."""
    caught = None
    for size, t, b in zip(reversed(sizes), reversed(transfer_ci), reversed(baseline_ci), strict=True):
        if b[1] < t[0]:
            break
        caught = size
    return caught


def labels_needed(sizes: list[float], accuracy: list[float], target: float) -> float | None:
    """Labels per class where the curve first reaches `target`, interpolated linearly on log size
    between the points around the crossing; None when no point reaches it."""
    for i, (size, acc) in enumerate(zip(sizes, accuracy, strict=True)):
        if acc >= target:
            if i == 0:
                return float(size)
            s0, a0 = sizes[i - 1], accuracy[i - 1]
            share = (target - a0) / (acc - a0)
            return float(math.exp(math.log(s0) + share * (math.log(size) - math.log(s0))))
    return None


def labels_needed_interval(sizes: list[float], replicates: np.ndarray, target: float, confidence: float) -> dict:
    """labels_needed on every bootstrap replicate of the curve (replicates: points x samples): its
    percentile interval over the replicates that reach the target, and the share that do not."""
    found = [labels_needed(sizes, list(rep), target) for rep in replicates.T]
    reached = np.array([f for f in found if f is not None])
    return {"ci": interval(reached, confidence) if reached.size else None,
            "unreached_share": float(1 - reached.size / len(found))}


def _finetune_hits(params: config.Params, *, layout: Layout, train: pd.DataFrame, val: pd.DataFrame,
                   test: pd.DataFrame, rows: np.ndarray, classes: list[str], seed: int) -> np.ndarray:
    """`partial` fine-tuned on one subset (train's settings), scored on the test split."""
    from graft.modeling import (
        build_classifier,
        load_tokenizer,
        predict_proba,
        seed_everything,
        select_device,
    )
    from graft.training import FitSettings, fit, prepare_strategy

    t, trust = params.train, params.model.trust_remote_code
    tokens = resolved_tokenization(params, layout)  # the length and truncation the features stage embedded with
    device = select_device()
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    seed_everything(seed)
    model = build_classifier(layout.pretrained_dir, classes=classes, trust_remote_code=trust, name="curve partial")
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=t.freeze_layers, lr=t.lr,
                                             weight_decay=t.weight_decay)
    settings = FitSettings(lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, weight_decay=t.weight_decay,
                           warmup_ratio=t.warmup_ratio, grad_accumulation=t.grad_accumulation,
                           max_length=tokens.max_length, truncation=tokens.truncation, seed=seed, patience=t.patience,
                           cache_frozen=t.cache_frozen, precision=t.precision)
    subset = train.iloc[rows]
    fit(model, tokenizer, train_texts=subset["text"].tolist(), train_labels=subset["label_id"].to_numpy(),
        val_texts=val["text"].tolist(), val_labels=val["label_id"].to_numpy(), settings=settings,
        param_groups=groups, device=device, freeze_layers=frozen, desc=f"curve partial {len(rows)}")
    model.eval()
    proba = predict_proba(model, tokenizer, test["text"].tolist(), max_length=tokens.max_length, truncation=tokens.truncation,
                          batch_size=params.features.batch_size, device=device, desc="curve predict")
    return proba.argmax(1) == test["label_id"].to_numpy()


def curve(params: config.Params, *, layout: Layout) -> dict:
    """Write reports/curve.json and its plot; a stub saying why when curve.enabled is false."""
    from graft.report import curve_png, note_png

    c = params.curve
    if not c.enabled:
        result = {"enabled": False, "reason": "curve.enabled is false (graft run -S curve.enabled=true)"}
        write_json(layout.curve_report, result)
        atomic_write_bytes(layout.curve_plot, note_png("data-efficiency curve: off (curve.enabled)"))
        return result
    # torch, transformers and scikit-learn only past the off switch: a stage that is off costs its
    # interpreter start, not the 10 s of those imports
    from graft.baselines import select_tfidf
    from graft.training import train_linear_probe

    split = {s: layout.split_file(s) for s in ("train", "val", "test")}
    require(*split.values(), layout.features_file("train"), layout.features_file("test"), root=layout.root)
    train, test = pd.read_parquet(split["train"]), pd.read_parquet(split["test"])
    val = pd.read_parquet(split["val"])
    train_x, test_x = np.load(layout.features_file("train")), np.load(layout.features_file("test"))
    val_x, y_val = np.load(layout.features_file("val")), val["label_id"].to_numpy()
    if len(train_x) != len(train) or len(test_x) != len(test):
        raise GraftError(f"{layout.features_dir}: features do not match the prepared splits; run the 'features' stage")
    y, y_test = train["label_id"].to_numpy(), test["label_id"].to_numpy()
    per_class = int(np.bincount(y).min())
    sizes = [k for k in c.sizes if k < per_class]
    skipped = [k for k in c.sizes if k >= per_class]
    ev = params.evaluate
    classes = sorted(train["label"].unique().tolist(), key=lambda name: int(train.loc[train["label"] == name, "label_id"].iloc[0]))
    points: dict[str, list[dict]] = {m: [] for m in (*TRANSFER, *BASELINES)}
    replicates: dict[str, list[np.ndarray]] = {m: [] for m in points}
    seeds_at = {k: (c.seeds if k < c.seeds_below else 1) for k in sizes}
    subsets = {s: nested_subsets(y, sizes, params.seed + s) for s in range(max(seeds_at.values(), default=1))}
    for label in [*sizes, ALL]:
        n_seeds = 1 if label == ALL else seeds_at[label]
        rows_per_seed = [np.arange(len(y)) if label == ALL else subsets[s][label] for s in range(n_seeds)]
        hits = {"linear_probe": [], "tfidf": []}
        for s, rows in enumerate(rows_per_seed):
            # C as train chooses it: fixed, or (auto) on the validation split, at this size
            weight, bias, _ = train_linear_probe(train_x[rows], y[rows], val_x, y_val, C=params.train.probe.C,
                                                 C_grid=params.train.probe.C_grid, seed=params.seed + s)
            hits["linear_probe"].append((test_x @ weight.T + bias).argmax(1) == y_test)
            tfidf, _ = select_tfidf(train["text"].iloc[rows].tolist(), y[rows], val["text"].tolist(), y_val,
                                    ngram_max=params.train.tfidf.ngram_max, C=params.train.tfidf.C,
                                    grid=params.train.tfidf.C_grid, seed=params.seed + s)
            hits["tfidf"].append(tfidf.predict(test["text"].tolist()) == y_test)
        if label in c.finetune_sizes:
            hits["partial"] = [_finetune_hits(params, layout=layout, train=train, val=val, test=test,
                                              rows=rows_per_seed[0], classes=classes, seed=params.seed)]
        for method, h in hits.items():
            acc, ci, reps = point_interval(np.array(h), ev.bootstrap_samples, ev.confidence, params.seed)
            per = float(len(rows_per_seed[0]) / len(classes)) if label == ALL else label
            points[method].append({"size": label, "labels_per_class": per, "labels": int(len(rows_per_seed[0])),
                                   "seeds": len(h), "accuracy": acc, "accuracy_ci": ci,
                                   "seed_accuracy": [float(x.mean()) for x in h]})
            replicates[method].append(reps)
    # the transfer curve: the linear probe, or a fine-tuned point where there is one and it is better
    probe = {p["size"]: p for p in points["linear_probe"]}
    best_transfer = [max([probe[p["size"]]] + [q for q in points["partial"] if q["size"] == p["size"]],
                         key=lambda q: q["accuracy"]) for p in points["linear_probe"]]
    labels = [p["size"] for p in best_transfer]
    full = max(p["accuracy"] for m in points.values() for p in m if p["size"] == ALL)
    target = c.target_share * full
    needed = {}
    for method in ("linear_probe", "tfidf"):
        xs = [p["labels_per_class"] for p in points[method]]
        accuracy = [p["accuracy"] for p in points[method]]
        needed[method] = {"labels_per_class": labels_needed(xs, accuracy, target),
                          # reached at the smallest size already: the number is an upper bound
                          "at_most": bool(accuracy[0] >= target),
                          **labels_needed_interval(xs, np.array(replicates[method]), target, ev.confidence)}
    catch = catch_up_size(labels, [p["accuracy_ci"] for p in best_transfer], [p["accuracy_ci"] for p in points["tfidf"]])
    result = {
        "enabled": True,
        "subsets": "stratified and nested: per seed each class's train rows are shuffled once; size k takes the "
                   "first k of every class, so each subset contains every smaller one of its seed",
        "interval": f"{round(100 * ev.confidence)}% bootstrap over seeds and test rows together",
        "sizes": labels, "skipped_sizes": skipped, "classes": classes,
        "curves": {m: p for m, p in points.items() if p},
        "transfer_curve": [{"size": p["size"], "accuracy": p["accuracy"], "accuracy_ci": p["accuracy_ci"]}
                           for p in best_transfer],
        "best_baseline": "tfidf",
        "catch_up_size": catch,
        "full_data_accuracy": full, "target_share": c.target_share, "target_accuracy": target,
        "labels_needed": needed,
    }
    write_json(layout.curve_report, result)
    atomic_write_bytes(layout.curve_plot, curve_png(result))
    return result


@exits_cleanly
def main() -> None:
    result = curve(config.load(), layout=Layout())
    if not result["enabled"]:
        print(f"curve: off ({result['reason']})")  # noqa: T201
        return
    need = result["labels_needed"]["linear_probe"]["labels_per_class"]
    print(  # noqa: T201
        f"curve: {len(result['sizes'])} sizes; TF-IDF catches up with transfer at {result['catch_up_size']} labels per class; "
        f"the linear probe needs {need if need is None else round(need, 1)} per class for "
        f"{result['target_accuracy']:.3f} ({result['target_share']:.0%} of {result['full_data_accuracy']:.3f})"
    )


if __name__ == "__main__":
    main()
