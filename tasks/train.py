"""train: the transferred model (backbone + new head, lower layers frozen) and two baselines on the
same split: the same architecture from random init (`scratch`) and TF-IDF + logistic regression."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from graft import config
from graft.baselines import load_tfidf  # noqa: F401  (re-exported for callers of the old path)
from graft.errors import exits_cleanly
from graft.files import atomic_path, write_json
from graft.layout import Layout
from graft.modeling import (
    autocast,
    build_classifier,
    collate,
    freeze_lower_layers,
    load_tokenizer,
    predict_proba,
    seed_everything,
    select_device,
    tokenize,
)

_LAYOUT = Layout()
PRETRAINED_DIR = _LAYOUT.pretrained_dir
PREPARED_DIR = _LAYOUT.prepared_dir
FINETUNED_DIR = _LAYOUT.finetuned_dir
BASELINES_DIR = _LAYOUT.baselines_dir


def load_split(name: str, prepared_dir: Path = PREPARED_DIR) -> pd.DataFrame:
    return pd.read_parquet(prepared_dir / f"{name}.parquet")

REPORT = Path("reports/train.json")
TRAINING_STATE = "training.json"


def fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    val_texts: Sequence[str],
    val_labels: np.ndarray,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    warmup_ratio: float,
    max_length: int,
    seed: int,
    device: torch.device,
    desc: str,
) -> dict:
    """Train the parameters that require grad; keep the weights of the best validation epoch."""
    model.to(device)
    ids = tokenize(tokenizer, train_texts, max_length)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(warmup_ratio * steps_per_epoch * epochs), steps_per_epoch * epochs
    )
    # A generator of its own, so the shuffle order does not depend on how many random
    # numbers model construction or dropout consumed.
    shuffle = torch.Generator().manual_seed(seed)
    history, best_state, best = [], None, {"epoch": 0, "val_accuracy": -1.0}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(ids), generator=shuffle).tolist()
        loss_sum = 0.0
        bar = tqdm(range(0, len(ids), batch_size), desc=f"{desc} epoch {epoch}/{epochs}", unit="step", mininterval=1.0)
        for start in bar:
            batch = order[start : start + batch_size]
            inputs = collate(tokenizer, [ids[i] for i in batch], device)
            targets = torch.as_tensor(train_labels[batch], device=device)
            with autocast(device):
                logits = model(**inputs).logits
            # the loss in fp32 even under bf16 autocast: small-batch cross-entropy is sensitive
            loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(batch)
        val_proba = predict_proba(
            model, tokenizer, val_texts, max_length=max_length, batch_size=64, device=device, desc=f"{desc} val"
        )
        val_accuracy = float((val_proba.argmax(1) == val_labels).mean())
        history.append({"epoch": epoch, "train_loss": loss_sum / len(ids), "val_accuracy": val_accuracy})
        tqdm.write(f"{desc} epoch {epoch}: train loss {loss_sum / len(ids):.4f}, val accuracy {val_accuracy:.4f}")
        if val_accuracy > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": val_accuracy}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"]}


def save_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, state: dict) -> None:
    """safetensors weights + config + tokenizer + how they were trained, written atomically."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / TRAINING_STATE, state)


def train_transformer(
    params: config.Params, *, classes: list[str], data: dict, device: torch.device, from_scratch: bool
) -> tuple[PreTrainedModel, dict]:
    """Build (pretrained or random-init), freeze, fit, and describe one transformer classifier."""
    t = params.train
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(PRETRAINED_DIR, trust_remote_code=trust)
    # Seed right before building, so the new head's init is the same whatever ran before.
    seed_everything(params.seed)
    model = build_classifier(PRETRAINED_DIR, classes=classes, from_scratch=from_scratch, trust_remote_code=trust)
    freeze = 0 if from_scratch else t.freeze_layers
    trainable = freeze_lower_layers(model, freeze)
    lr, epochs = (t.scratch.lr, t.scratch.epochs) if from_scratch else (t.lr, t.epochs)
    started = time.perf_counter()
    result = fit(
        model, tokenizer, **data, lr=lr, weight_decay=t.weight_decay, epochs=epochs, batch_size=t.batch_size,
        warmup_ratio=t.warmup_ratio, max_length=params.model.max_length, seed=params.seed, device=device,
        desc="scratch" if from_scratch else "finetune",
    )
    state = {
        **result,
        "init": "random" if from_scratch else "pretrained",
        "freeze_layers": freeze,
        "trainable_parameters": trainable,
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
        "lr": lr,
        "epochs": epochs,
        "seed": params.seed,
        "device": device.type,
        "seconds": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return model.cpu(), state


def train_tfidf(params: config.Params, *, texts: Sequence[str], labels: np.ndarray, classes: list[str], out_dir: Path) -> dict:
    """TF-IDF + logistic regression, stored as JSON + npz (no pickle)."""
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, params.train.tfidf.ngram_max), sublinear_tf=True)
    x = vectorizer.fit_transform(texts)
    clf = LogisticRegression(C=params.train.tfidf.C, max_iter=5000, random_state=params.seed).fit(x, labels)
    vocabulary = [None] * len(vectorizer.vocabulary_)
    for term, index in vectorizer.vocabulary_.items():
        vocabulary[index] = term
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "vocabulary.json").write_text(json.dumps(vocabulary))
        np.savez(tmp / "weights.npz", idf=vectorizer.idf_, coef=clf.coef_, intercept=clf.intercept_)
        state = {"classes": classes, "ngram_max": params.train.tfidf.ngram_max, "C": params.train.tfidf.C,
                 "vocabulary_size": len(vocabulary), "seconds": round(time.perf_counter() - started, 2)}
        write_json(tmp / TRAINING_STATE, state)
    return state


def train(params: config.Params) -> dict:
    """Train the transferred model and both baselines; write the models and reports/train.json."""
    device = select_device()
    train_df, val_df = load_split("train", PREPARED_DIR), load_split("val", PREPARED_DIR)
    classes = json.loads((PREPARED_DIR / "datacard.json").read_text())["classes"]
    data = {
        "train_texts": train_df["text"].tolist(), "train_labels": train_df["label_id"].to_numpy(),
        "val_texts": val_df["text"].tolist(), "val_labels": val_df["label_id"].to_numpy(),
    }
    tokenizer = load_tokenizer(PRETRAINED_DIR, trust_remote_code=params.model.trust_remote_code)
    report = {"device": device.type, "classes": classes, "candidates": {}}

    model, state = train_transformer(params, classes=classes, data=data, device=device, from_scratch=False)
    save_classifier(model, tokenizer, FINETUNED_DIR, state)
    report["candidates"]["finetune"] = state

    model, state = train_transformer(params, classes=classes, data=data, device=device, from_scratch=True)
    save_classifier(model, tokenizer, BASELINES_DIR / "scratch", state)
    report["candidates"]["scratch"] = state

    report["candidates"]["tfidf"] = train_tfidf(
        params, texts=data["train_texts"], labels=data["train_labels"], classes=classes, out_dir=BASELINES_DIR / "tfidf"
    )
    write_json(REPORT, report)
    return report


@exits_cleanly
def main() -> None:
    report = train(config.load())
    for name, state in report["candidates"].items():
        val = state.get("best_val_accuracy")
        print(f"train: {name}: {state['seconds']}s" + (f", best val accuracy {val:.4f}" if val is not None else ""))  # noqa: T201


if __name__ == "__main__":
    main()
