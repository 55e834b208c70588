"""features: resolve `model.max_length` (auto: from the train split's token lengths), embed every
split with the frozen backbone (mean pooling) at that length, score transferability."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from graft import config
from graft.errors import exits_cleanly
from graft.files import atomic_path, write_json
from graft.layout import RECIPE_FILE, SPLITS, Layout, require
from graft.lengths import (
    Tokenization,
    backbone_cap,
    recipe,
    resolve_max_length,
    summary_line,
    token_lengths,
    token_lengths_png,
)
from graft.modeling import embed, load_encoder, load_tokenizer, select_device


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11) -> float:
    """LogME (You et al., ICML 2021): mean per-class log marginal evidence of a Bayesian linear
    model on frozen features. Higher means the features transfer better; no training needed."""
    f = features.astype(np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    k = sigma.size
    evidences = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)
        x = u.T @ y
        x2 = x**2
        residual_outside = max(float(y @ y - x2.sum()), 0.0)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * (np.log(alpha + beta * sigma).sum() + (d - k) * np.log(alpha))
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> float:
    """Validation accuracy of a logistic-regression probe on frozen features."""
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    return float((probe.predict(val_x) == val_y).mean())


def sequence_length(params: config.Params, tokenizer, encoder, train_texts: list[str]) -> tuple[Tokenization, dict]:
    """The length every stage cuts texts to (`auto` resolved on the train split), its facts."""
    m = params.model
    lengths = token_lengths(tokenizer, train_texts)
    max_length, facts = resolve_max_length(m.max_length, lengths, coverage=m.length_coverage, budget=m.length_budget,
                                           cap=backbone_cap(encoder.config, tokenizer))
    return Tokenization(max_length=max_length, truncation=m.truncation), {**facts, "truncation": m.truncation}


def features(params: config.Params, *, pretrained_dir: Path, prepared_dir: Path, out_dir: Path,
             report: Path, length_report: Path, length_plot: Path) -> dict:
    """Resolve the sequence length, embed train/val/test and write one .npy per split, the recipe
    (the length and truncation used), the transferability and sequence-length reports."""
    splits = {split: prepared_dir / f"{split}.parquet" for split in SPLITS}
    require(pretrained_dir / "config.json", *splits.values())
    device = select_device()
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(pretrained_dir, trust_remote_code=trust)
    encoder = load_encoder(pretrained_dir, trust_remote_code=trust)
    started = time.perf_counter()
    frames = {split: pd.read_parquet(path, columns=["text", "label_id"]) for split, path in splits.items()}
    tokenization, length_facts = sequence_length(params, tokenizer, encoder, frames["train"]["text"].tolist())
    embedded, labels = {}, {}
    for split, frame in frames.items():
        embedded[split] = embed(
            encoder, tokenizer, frame["text"].tolist(), max_length=tokenization.max_length,
            truncation=tokenization.truncation, batch_size=params.features.batch_size, device=device,
            desc=f"embed {split}",
        )
        labels[split] = frame["label_id"].to_numpy()
    unlabelled = prepared_dir / "unlabelled.parquet"
    extra = {}
    if unlabelled.exists():  # prepare wrote it: data.unlabelled_source is set (self-training reads these)
        extra["unlabelled"] = embed(encoder, tokenizer, pd.read_parquet(unlabelled, columns=["text"])["text"].tolist(),
                                    max_length=params.model.max_length, batch_size=params.features.batch_size,
                                    device=device, desc="embed unlabelled")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split, matrix in {**embedded, **extra}.items():
            np.save(tmp / f"{split}.npy", matrix)
        write_json(tmp / RECIPE_FILE, recipe(tokenization, requested=params.model.max_length))
    write_json(length_report, length_facts)
    with atomic_path(length_plot) as tmp:
        tmp.write_bytes(token_lengths_png(length_facts))
    result = {
        "backbone": str(pretrained_dir),
        "pooling": "mean",
        "logme": logme(embedded["train"], labels["train"]),
        "probe_val_accuracy": probe_accuracy(embedded["train"], labels["train"], embedded["val"], labels["val"], params.seed),
        "dims": int(embedded["train"].shape[1]),
        "rows": {split: int(m.shape[0]) for split, m in {**embedded, **extra}.items()},
        "max_length": tokenization.max_length,
    }
    write_json(report, result)
    # run facts stay out of the report: it is a dependency of register, and must not change
    # when the same features are computed again
    return {**result, "seconds": round(time.perf_counter() - started, 2), "device": device.type,
            "sequence_length": length_facts}


@exits_cleanly
def main() -> None:
    layout = Layout()
    result = features(config.load(), pretrained_dir=layout.pretrained_dir, prepared_dir=layout.prepared_dir,
                      out_dir=layout.features_dir, report=layout.transferability,
                      length_report=layout.sequence_length, length_plot=layout.token_lengths_plot)
    print(f"features: {summary_line(result['sequence_length'])}")  # noqa: T201
    print(  # noqa: T201
        f"features: {sum(result['rows'].values())} texts embedded in {result['seconds']}s; "
        f"LogME {result['logme']:.3f}, frozen probe val accuracy {result['probe_val_accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
