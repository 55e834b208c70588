"""train: every transfer strategy in `train.strategies` plus the two baselines on the same split:
the same architecture from random init (`scratch`) and TF-IDF + logistic regression (`tfidf`).

Writes one plain model folder per candidate (models/finetuned/<strategy>/, models/baselines/
{scratch,tfidf}/) and reports/train.json: the candidates, the one `proposed` (best on
validation, never test) and the run facts (seconds, throughput, device) that model folders
must not hold. With `train.nproc_per_node > 1` the stage re-launches itself under torchrun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from graft import config
from graft.baselines import fit_tfidf, save_tfidf
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, read_json, sha256_file, write_json
from graft.layout import Layout, require
from graft.modeling import (
    PROBE_HEAD_FILE,
    build_classifier,
    load_encoder,
    load_tokenizer,
    save_probe_classifier,
    seed_everything,
)
from graft.serving import LINEAR_PROBE, SEQUENCE_CLASSIFICATION, describe, write_description
from graft.training import (
    FitSettings,
    dist_env,
    fingerprint_of,
    fit,
    init_distributed,
    prepare_strategy,
    train_linear_probe,
    write_training_state,
)

TRAINING_STATE = "training.json"


def checkpoints_dir(layout: Layout) -> Path:
    return layout.checkpoints_dir


def _settings(params: config.Params, *, lr: float, epochs: int) -> FitSettings:
    t = params.train
    return FitSettings(
        lr=lr, epochs=epochs, batch_size=t.batch_size, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
        grad_accumulation=t.grad_accumulation, max_length=params.model.max_length, seed=params.seed,
        patience=t.patience, cache_frozen=t.cache_frozen, checkpoint_every=t.checkpoint_every, compile=t.compile,
        precision=t.precision,
    )


def resolve_freeze_layers(freeze_layers: int | str, layout: Layout) -> int:
    """train.freeze_layers as a block count; `auto` is the select stage's choice from the chosen
    backbone's per-layer LogME (graft.transferability.freeze_depth), kept in its manifest."""
    if freeze_layers != "auto":
        return int(freeze_layers)
    selection = read_json(layout.manifest).get("selection")
    if selection is None:
        raise GraftError(f"{layout.manifest}: no selection; train.freeze_layers auto needs the select stage's scores")
    return int(selection["freeze_layers_auto"])


def train_transformer(params: config.Params, strategy: str, *, classes: list[str], data: dict, layout: Layout,
                      device: torch.device, data_digest: str) -> tuple[torch.nn.Module, dict]:
    """Build, adapt, fit and describe one transformer candidate (`scratch` included)."""
    t = params.train
    trust = params.model.trust_remote_code
    lr, epochs, freeze = {
        "partial": (t.lr, t.epochs, resolve_freeze_layers(t.freeze_layers, layout)),
        "full": (t.full.lr, t.full.epochs, 0),
        "lora": (t.lora.lr, t.lora.epochs, 0),
        "scratch": (t.scratch.lr, t.scratch.epochs, 0),
    }[strategy]
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    # Seed right before building, so the new head's (and adapters') init is the same whatever ran before.
    seed_everything(params.seed)
    model = build_classifier(layout.pretrained_dir, classes=classes, from_scratch=strategy == "scratch",
                             trust_remote_code=trust, name=strategy)
    lora = {"r": t.lora.r, "alpha": t.lora.alpha, "dropout": t.lora.dropout}
    model, frozen, groups = prepare_strategy(model, strategy, freeze_layers=freeze, lr=lr, weight_decay=t.weight_decay,
                                             layer_decay=t.full.layer_decay, lora=lora)
    settings = _settings(params, lr=lr, epochs=epochs)
    _, world = dist_env()
    # the backbone by content (its manifest), not by name: a resume must see the same weights
    fingerprint = fingerprint_of(strategy, t.model_dump(), params.model.max_length, params.model.trust_remote_code,
                                 sha256_file(layout.manifest), params.seed, world, data_digest)
    result = fit(model, tokenizer, **data, settings=settings, param_groups=groups, device=device, freeze_layers=frozen,
                 checkpoint_dir=checkpoints_dir(layout) / strategy, fingerprint=fingerprint, desc=strategy)
    val_proba = result.pop("val_proba")
    trainable = sum(p.numel() for g in groups for p in g["params"])
    if strategy == "lora":
        model = model.merge_and_unload()  # a plain model: loaders need neither peft nor the adapter
    state = {
        **result,
        "strategy": strategy,
        "init": "random" if strategy == "scratch" else "pretrained",
        "freeze_layers": frozen,
        "trainable_parameters": trainable,
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
        "lr": lr,
        "epochs": epochs,
        "seed": params.seed,
    }
    return model.cpu(), state, val_proba


def train_probe(params: config.Params, *, classes: list[str], data: dict, layout: Layout, out_dir: Path) -> dict:
    """The linear probe on the features stage's embeddings: no backbone forward pass at all."""
    require(layout.features_file("train"), layout.features_file("val"), root=layout.root)
    train_x, val_x = np.load(layout.features_file("train")), np.load(layout.features_file("val"))
    weight, bias, facts = train_linear_probe(train_x, data["train_labels"], val_x, data["val_labels"],
                                             C=params.train.probe.C, seed=params.seed)
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    serving = describe(labels=classes, max_length=params.model.max_length, tokenizer=tokenizer, head=LINEAR_PROBE,
                       head_file=PROBE_HEAD_FILE)
    save_probe_classifier(load_encoder(layout.pretrained_dir, trust_remote_code=trust), tokenizer,
                          weight, bias, classes=classes, out_dir=out_dir,
                          also_write=lambda folder: write_description(folder, serving))
    state = {**facts, "strategy": "linear_probe", "init": "pretrained", "pooling": "mean",
             "trainable_parameters": int(weight.size + bias.size), "seed": params.seed}
    write_training_state(out_dir / TRAINING_STATE, state)
    return state


def save_transformer(model: torch.nn.Module, tokenizer, out_dir: Path, state: dict, *, max_length: int) -> None:
    """safetensors weights + config + tokenizer + how they were trained + how evaluate scores
    them (the serving description), written atomically."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_training_state(tmp / TRAINING_STATE, state)
        write_description(tmp, describe(labels=labels, max_length=max_length, tokenizer=tokenizer,
                                        head=SEQUENCE_CLASSIFICATION))


def _candidate(kind: str, path: Path, layout: Layout, state: dict) -> dict:
    run_facts = {k: state[k] for k in ("seconds", "throughput", "cache_seconds", "frozen_cached") if k in state}
    return {"kind": kind, "path": Path(path).relative_to(layout.root).as_posix(), "strategy": state.get("strategy"),
            "best_val_accuracy": state.get("best_val_accuracy"), "best_epoch": state.get("best_epoch"),
            "trainable_parameters": state.get("trainable_parameters"), **run_facts}


def train(params: config.Params, *, layout: Layout | None = None) -> dict:
    """Train every strategy and both baselines; write the models and reports/train.json (rank 0)."""
    layout = layout or Layout()
    device = init_distributed()
    rank, world = dist_env()
    require(layout.split_file("train"), layout.split_file("val"), layout.datacard, layout.pretrained_dir, root=layout.root)
    train_df, val_df = pd.read_parquet(layout.split_file("train")), pd.read_parquet(layout.split_file("val"))
    classes = read_json(layout.datacard)["classes"]
    data = {
        "train_texts": train_df["text"].tolist(), "train_labels": train_df["label_id"].to_numpy(),
        "val_texts": val_df["text"].tolist(), "val_labels": val_df["label_id"].to_numpy(),
    }
    data_digest = fingerprint_of(sha256_file(layout.split_file("train")), sha256_file(layout.split_file("val")))
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=params.model.trust_remote_code)
    candidates: dict[str, dict] = {}
    val_proba: dict[str, np.ndarray | None] = {}
    for strategy in [*params.train.strategies, "scratch"]:
        kind = "baseline" if strategy == "scratch" else "transfer"
        out_dir = layout.baselines_dir / "scratch" if strategy == "scratch" else layout.finetuned_dir / strategy
        if strategy == "linear_probe":
            state = train_probe(params, classes=classes, data=data, layout=layout, out_dir=out_dir) if rank == 0 else {}
        else:
            model, state, val_proba[strategy] = train_transformer(params, strategy, classes=classes, data=data,
                                                                  layout=layout, device=device, data_digest=data_digest)
            if rank == 0:
                save_transformer(model, tokenizer, out_dir, state, max_length=params.model.max_length)
                # the model is safe on disk: its resume state has served (a kill before this
                # line resumes a finished run, which only saves the model again)
                shutil.rmtree(checkpoints_dir(layout) / strategy, ignore_errors=True)
        candidates[strategy] = {**_candidate("transformer", out_dir, layout, state), "role": kind} if rank == 0 else {}
    if rank == 0:
        t = params.train.tfidf
        pipeline = fit_tfidf(data["train_texts"], data["train_labels"], ngram_max=t.ngram_max, C=t.C, seed=params.seed)
        val_accuracy = float((pipeline.predict(data["val_texts"]) == data["val_labels"]).mean())
        state = {"strategy": "tfidf", "classes": classes, "ngram_max": t.ngram_max, "C": t.C,
                 "vocabulary_size": len(pipeline.named_steps["tfidf"].vocabulary_), "best_val_accuracy": val_accuracy}
        save_tfidf(pipeline, layout.baselines_dir / "tfidf", state)
        candidates["tfidf"] = {**_candidate("tfidf", layout.baselines_dir / "tfidf", layout, state), "role": "baseline"}
    if world > 1:
        dist.barrier()
    if rank != 0:
        return {}
    # The proposal is made on validation only; ties go to the strategy listed first.
    transfer = [s for s in params.train.strategies]
    proposed = max(transfer, key=lambda s: (candidates[s]["best_val_accuracy"], -transfer.index(s)))
    report = {"device": device.type, "world_size": world, "torch": torch.__version__, "classes": classes,
              "candidates": candidates, "proposed": proposed}
    write_candidates(layout, params.train.strategies, candidates, proposed, classes)
    write_val_predictions(layout, val_df["id"].astype(str).to_numpy(), val_proba)
    write_json(layout.train_report, report)
    return report


MANIFEST_KEYS = ("kind", "path", "strategy", "role", "best_val_accuracy", "best_epoch")


def write_candidates(layout: Layout, strategies: list[str], candidates: dict, proposed: str, classes: list[str]) -> None:
    """The deterministic part of the report, inside models/finetuned (what evaluate and register
    read), and no folder of a strategy that is no longer trained (outputs persist between runs)."""
    for folder in layout.finetuned_dir.iterdir():
        if folder.is_dir() and folder.name not in strategies:
            shutil.rmtree(folder)
    manifest = {"classes": classes, "proposed": proposed,
                "candidates": {name: {k: c.get(k) for k in MANIFEST_KEYS} for name, c in candidates.items()}}
    write_json(layout.candidates, manifest)


def write_val_predictions(layout: Layout, ids: np.ndarray, val_proba: dict[str, np.ndarray | None]) -> None:
    """The best epoch's validation probabilities per transformer candidate, keyed by val row id."""
    arrays = {f"proba/{name}": p for name, p in sorted(val_proba.items()) if p is not None and len(p) == len(ids)}
    with atomic_path(layout.val_predictions) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, ids=ids.astype(str), **arrays)


def launch_under_torchrun(nproc: int) -> int:
    """Re-run this stage as `torchrun --standalone --nproc_per_node=N -m tasks.train`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tasks.train"]
    return subprocess.run(cmd, check=False).returncode


@exits_cleanly
def main() -> None:
    params = config.load()
    if params.train.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        raise SystemExit(launch_under_torchrun(params.train.nproc_per_node))
    report = train(params)
    for name, cand in report.get("candidates", {}).items():
        val = cand.get("best_val_accuracy")
        seconds = cand.get("seconds")
        print(f"train: {name}: " + (f"{seconds}s, " if seconds is not None else "")  # noqa: T201
              + (f"best val accuracy {val:.4f}" if val is not None else ""))
    if report:
        print(f"train: proposed {report['proposed']} (best on validation)")  # noqa: T201
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
