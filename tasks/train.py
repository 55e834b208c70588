"""train: every transfer strategy in `train.strategies` plus the two baselines on the same split:
the same architecture from random init (`scratch`) and TF-IDF + logistic regression (`tfidf`).
The `setfit` strategy trains with the setfit library and is saved folded into graft's own
mean-pooling classifier (graft.contrastive): evaluate, register and serving read it like a probe.

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
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from graft import config
from graft.adaptation import self_train_probe
from graft.baselines import save_tfidf, select_tfidf
from graft.contrastive import body_parts, fit_body, fold, load_setfit_model
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, read_json, sha256_file, write_json
from graft.layout import Layout, require
from graft.lengths import Tokenization, resolved_tokenization
from graft.modeling import (
    PROBE_HEAD_FILE,
    MeanPoolingClassifier,
    build_classifier,
    embed,
    load_encoder,
    load_tokenizer,
    predict_proba,
    save_probe_classifier,
    seed_everything,
)
from graft.serving import LINEAR_PROBE, SEQUENCE_CLASSIFICATION, describe, write_description
from graft.training import (
    FitSettings,
    dist_env,
    fingerprint_of,
    fit,
    fit_probe_head,
    init_distributed,
    prepare_strategy,
    train_linear_probe,
    write_training_state,
)

TRAINING_STATE = "training.json"


def checkpoints_dir(layout: Layout) -> Path:
    return layout.checkpoints_dir


def _settings(params: config.Params, tokens: Tokenization, *, lr: float, epochs: int) -> FitSettings:
    t = params.train
    return FitSettings(
        lr=lr, epochs=epochs, batch_size=t.batch_size, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
        grad_accumulation=t.grad_accumulation, max_length=tokens.max_length, truncation=tokens.truncation,
        seed=params.seed,
        patience=t.patience, cache_frozen=t.cache_frozen, checkpoint_every=t.checkpoint_every, compile=t.compile,
        precision=t.precision, inference=tokens.inference,
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
                      tokens: Tokenization, device: torch.device, data_digest: str,
                      backbone_dir: Path | None = None, run_name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build, adapt, fit and describe one transformer candidate (`scratch` included), from the
    fetched backbone or `backbone_dir` (the MLM-adapted one); `run_name` (default: the strategy)
    names its resume folder and progress bar."""
    backbone_dir = backbone_dir or layout.pretrained_dir
    run_name = run_name or strategy
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
    model = build_classifier(backbone_dir, classes=classes, from_scratch=strategy == "scratch",
                             trust_remote_code=trust, name=run_name)
    lora = {"r": t.lora.r, "alpha": t.lora.alpha, "dropout": t.lora.dropout}
    model, frozen, groups = prepare_strategy(model, strategy, freeze_layers=freeze, lr=lr, weight_decay=t.weight_decay,
                                             layer_decay=t.full.layer_decay, lora=lora)
    settings = _settings(params, tokens, lr=lr, epochs=epochs)
    _, world = dist_env()
    # the backbone by content (its manifest), not by name: a resume must see the same weights
    weights = layout.manifest if backbone_dir == layout.pretrained_dir else Path(backbone_dir) / "model.safetensors"
    fingerprint = fingerprint_of(run_name, t.model_dump(), tokens.max_length, tokens.truncation,
                                 params.model.trust_remote_code, sha256_file(weights), params.seed, world, data_digest)
    result = fit(model, tokenizer, **data, settings=settings, param_groups=groups, device=device, freeze_layers=frozen,
                 checkpoint_dir=checkpoints_dir(layout) / run_name, fingerprint=fingerprint, desc=run_name)
    val_proba = result.pop("val_proba")
    trainable = sum(p.numel() for g in groups for p in g["params"])
    if strategy == "lora":
        model = model.merge_and_unload()  # a plain model: loaders need neither peft nor the adapter
    state = {
        **result,
        "strategy": strategy,
        "init": "random" if strategy == "scratch" else "pretrained" if backbone_dir == layout.pretrained_dir else "adapted",
        "freeze_layers": frozen,
        "trainable_parameters": trainable,
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
        "lr": lr,
        "epochs": epochs,
        "seed": params.seed,
    }
    return model.cpu(), state, val_proba


def train_probe(params: config.Params, *, classes: list[str], data: dict, layout: Layout, tokens: Tokenization,
                out_dir: Path, method: str | None = None, device: torch.device | None = None,
                self_training: dict | None = None, embed_batch_size: int = 64) -> dict:
    """The linear probe on the features stage's embeddings: no backbone forward pass at all.
    `method` mlm: on the MLM-adapted backbone's embeddings (computed here); self_training: on
    the cached embeddings, with pseudo-labels of the unlabelled texts (threshold and rounds
    chosen on validation)."""
    trust = params.model.trust_remote_code
    probe = params.train.probe
    backbone_dir = layout.adapted_dir if method == "mlm" else layout.pretrained_dir
    if method == "mlm":
        encoder, tokenizer = load_encoder(backbone_dir, trust_remote_code=trust), load_tokenizer(backbone_dir, trust_remote_code=trust)
        train_x, val_x = (embed(encoder, tokenizer, data[f"{split}_texts"], max_length=tokens.max_length,
                                truncation=tokens.truncation, batch_size=embed_batch_size, inference=tokens.inference,
                                device=device or torch.device("cpu"), desc=f"embed {split} (adapted)")
                          for split in ("train", "val"))
    else:
        require(layout.features_file("train"), layout.features_file("val"), root=layout.root)
        train_x, val_x = np.load(layout.features_file("train")), np.load(layout.features_file("val"))
    if method == "self_training":
        require(layout.unlabelled_features, root=layout.root)
        weight, bias, facts = self_train_probe(train_x, data["train_labels"], val_x, data["val_labels"],
                                               np.load(layout.unlabelled_features), **self_training,
                                               C=probe.C, C_grid=probe.C_grid, seed=params.seed)
    else:
        weight, bias, facts = train_linear_probe(train_x, data["train_labels"], val_x, data["val_labels"],
                                                 C=probe.C, C_grid=probe.C_grid, seed=params.seed)
    tokenizer = load_tokenizer(backbone_dir, trust_remote_code=trust)
    serving = describe(labels=classes, max_length=tokens.max_length, truncation=tokens.truncation, tokenizer=tokenizer,
                       head=LINEAR_PROBE, head_file=PROBE_HEAD_FILE, inference=tokens.inference)
    save_probe_classifier(load_encoder(backbone_dir, trust_remote_code=trust), tokenizer,
                          weight, bias, classes=classes, out_dir=out_dir,
                          also_write=lambda folder: write_description(folder, serving))
    state = {**facts, "strategy": "linear_probe", "init": "adapted" if method == "mlm" else "pretrained",
             "pooling": "mean", **({"adaptation": method} if method else {}),
             "trainable_parameters": int(weight.size + bias.size), "seed": params.seed}
    write_training_state(out_dir / TRAINING_STATE, state)
    return state


def train_setfit(params: config.Params, *, classes: list[str], data: dict, layout: Layout, tokens: Tokenization,
                 out_dir: Path, device: torch.device) -> tuple[dict, np.ndarray]:
    """The `setfit` strategy: setfit's contrastive phase fine-tunes the backbone as a sentence-
    transformer body; a logistic-regression head is fitted on the trained body's train embeddings
    (C fixed or chosen on validation, as the linear probe's); body and head are folded into graft's
    MeanPoolingClassifier and saved as a probe-head folder. Its validation accuracy and
    probabilities are the folded model's. Returns (state, val probabilities)."""
    s, trust = params.train.setfit, params.model.trust_remote_code
    started = time.perf_counter()
    seed_everything(params.seed)
    model = load_setfit_model(layout.pretrained_dir, max_length=tokens.max_length, truncation=tokens.truncation,
                              trust_remote_code=trust)
    settings = fit_body(model, data["train_texts"], data["train_labels"], lr=s.lr, epochs=s.epochs,
                        batch_size=s.batch_size, num_iterations=s.num_iterations, max_length=tokens.max_length,
                        seed=params.seed)
    body_seconds = time.perf_counter() - started
    encoder, normalize = body_parts(model)
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    # the head sees what the folded model computes: graft's cut of the texts, mean pooling, Normalize
    train_x, val_x = (embed(encoder, tokenizer, data[f"{split}_texts"], max_length=tokens.max_length,
                            truncation=tokens.truncation, batch_size=params.features.batch_size,
                            inference=tokens.inference, device=device, desc=f"setfit embed {split}")
                      for split in ("train", "val"))
    if normalize:
        train_x, val_x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (train_x, val_x))
    model.model_head, _, search = fit_probe_head(train_x, data["train_labels"], val_x, data["val_labels"],
                                                 C=s.C, C_grid=s.C_grid, seed=params.seed)
    encoder, weight, bias, normalize = fold(model, len(classes))
    encoder.config.num_labels = len(classes)  # the classifier's width (save_probe_classifier names them too)
    classifier = MeanPoolingClassifier(encoder, torch.from_numpy(weight), torch.from_numpy(bias), normalize=normalize)
    val_proba = predict_proba(classifier, tokenizer, data["val_texts"], max_length=tokens.max_length,
                              truncation=tokens.truncation, batch_size=params.features.batch_size, device=device,
                              inference=tokens.inference, desc="setfit val")
    val_accuracy = float((val_proba.argmax(1) == np.asarray(data["val_labels"])).mean())
    state = {"strategy": "setfit", "init": "pretrained", "pooling": "mean", "normalize": normalize,
             "best_val_accuracy": val_accuracy, "best_epoch": s.epochs,
             "history": [{"epoch": s.epochs, "val_accuracy": val_accuracy}], **search, "setfit": settings,
             "trainable_parameters": int(sum(p.numel() for p in encoder.parameters()) + weight.size + bias.size),
             "total_parameters": int(sum(p.numel() for p in classifier.parameters())), "seed": params.seed}
    serving = describe(labels=classes, max_length=tokens.max_length, truncation=tokens.truncation, tokenizer=tokenizer,
                       head=LINEAR_PROBE, head_file=PROBE_HEAD_FILE, inference=tokens.inference, normalize=normalize)

    def also_write(folder: Path) -> None:
        write_description(folder, serving)
        write_training_state(folder / TRAINING_STATE, state)

    save_probe_classifier(encoder.cpu(), tokenizer, weight, bias, classes=classes, out_dir=out_dir,
                          also_write=also_write, normalize=normalize)
    return {**state, "seconds": round(time.perf_counter() - started, 3), "body_seconds": round(body_seconds, 3)}, val_proba


def save_transformer(model: torch.nn.Module, tokenizer, out_dir: Path, state: dict, *, tokens: Tokenization) -> None:
    """safetensors weights + config + tokenizer + how they were trained + how evaluate scores
    them (the serving description), written atomically."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_training_state(tmp / TRAINING_STATE, state)
        write_description(tmp, describe(labels=labels, max_length=tokens.max_length, truncation=tokens.truncation,
                                        tokenizer=tokenizer, head=SEQUENCE_CLASSIFICATION, inference=tokens.inference))


def _candidate(kind: str, path: Path, layout: Layout, state: dict) -> dict:
    run_facts = {k: state[k] for k in ("seconds", "throughput", "cache_seconds", "frozen_cached", "body_seconds")
                 if k in state}
    regularisation = {k: state[k] for k in ("C", "C_search") if k in state}
    return {"kind": kind, "path": Path(path).relative_to(layout.root).as_posix(), "strategy": state.get("strategy"),
            "best_val_accuracy": state.get("best_val_accuracy"), "best_epoch": state.get("best_epoch"),
            "trainable_parameters": state.get("trainable_parameters"), **regularisation, **run_facts}


def train_seeds(params: config.Params, strategy: str, *, classes: list[str], data: dict, layout: Layout,
                tokens: Tokenization, device: torch.device, data_digest: str, tokenizer) -> dict:
    """The proposed strategy again with seeds seed+1..seed+train.seeds-1, same recipe, each in
    models/finetuned/seeds/seed-<s>/ (the registered model stays the base seed's). The linear
    probe is not retrained: lbfgs on its convex objective reaches the same fit whatever the seed
    (sklearn uses random_state only for the sag/saga/liblinear solvers), so N copies would be
    one model N times. Returns what the manifest records about the seeds."""
    rank, _ = dist_env()
    if rank == 0:
        shutil.rmtree(layout.seed_models_dir, ignore_errors=True)  # outputs persist: no stale seed of an older run
    extra = [params.seed + k for k in range(1, params.train.seeds)]
    out = {"strategy": strategy, "base_seed": params.seed, "requested": params.train.seeds, "models": {}}
    if strategy == "linear_probe":
        return {**out, "note": "linear_probe is deterministic in the seed (convex, lbfgs): trained once"}
    for seed in extra:
        seeded = params.model_copy(update={"seed": seed})
        name = f"{strategy}-seed-{seed}"
        if strategy == "setfit":  # one process (config refuses setfit under torchrun)
            folder = layout.seed_model_dir(seed)
            state, _ = train_setfit(seeded, classes=classes, data=data, layout=layout, tokens=tokens, out_dir=folder,
                                    device=device)
            out["models"][str(seed)] = _candidate("transformer", folder, layout, state)
            continue
        model, state, _ = train_transformer(seeded, strategy, classes=classes, data=data, layout=layout, tokens=tokens,
                                            device=device, data_digest=data_digest, run_name=name)
        if rank == 0:
            folder = layout.seed_model_dir(seed)
            save_transformer(model, tokenizer, folder, state, tokens=tokens)
            shutil.rmtree(checkpoints_dir(layout) / name, ignore_errors=True)
            out["models"][str(seed)] = _candidate("transformer", folder, layout, state)
    return out


def train(params: config.Params, *, layout: Layout | None = None) -> dict:
    """Train every strategy and both baselines; write the models and reports/train.json (rank 0)."""
    layout = layout or Layout()
    device = init_distributed()
    rank, world = dist_env()
    require(layout.split_file("train"), layout.split_file("val"), layout.datacard, layout.pretrained_dir, root=layout.root)
    tokens = resolved_tokenization(params, layout)  # the length and truncation the features stage embedded with
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
            state = (train_probe(params, classes=classes, data=data, layout=layout, tokens=tokens, out_dir=out_dir)
                     if rank == 0 else {})
        elif strategy == "setfit":  # one process (config refuses setfit under torchrun)
            state, val_proba[strategy] = train_setfit(params, classes=classes, data=data, layout=layout, tokens=tokens,
                                                      out_dir=out_dir, device=device)
        else:
            model, state, val_proba[strategy] = train_transformer(params, strategy, classes=classes, data=data,
                                                                  layout=layout, tokens=tokens, device=device,
                                                                  data_digest=data_digest)
            if rank == 0:
                save_transformer(model, tokenizer, out_dir, state, tokens=tokens)
                # the model is safe on disk: its resume state has served (a kill before this
                # line resumes a finished run, which only saves the model again)
                shutil.rmtree(checkpoints_dir(layout) / strategy, ignore_errors=True)
        candidates[strategy] = {**_candidate("transformer", out_dir, layout, state), "role": kind} if rank == 0 else {}
    # read whether or not anything is adapted: dvc.yaml lists them, so changing them re-runs train
    adapt, embed_batch_size = params.adapt, params.features.batch_size
    mlm_strategy, self_training = adapt.strategy, adapt.self_training
    self_training_grid = {"thresholds": self_training.thresholds, "max_rounds": self_training.max_rounds}
    plan = [(method, "linear_probe" if method == "self_training" else mlm_strategy) for method in adapt.methods]
    # the adapt stage's note says what models/adapted holds: an MLM candidate needs its backbone
    adapted = read_json(layout.adapted_state) if layout.adapted_state.exists() else {}
    if "mlm" in adapt.methods and adapted.get("method") != "mlm":
        raise GraftError(f"{layout.adapted_state}: no masked-LM-adapted backbone (adapt.methods has mlm); "
                         "run the 'adapt' stage first (graft stage adapt)")
    for method, strategy in plan:
        name, out_dir = adaptation_candidate(strategy, method), layout.finetuned_dir / adaptation_candidate(strategy, method)
        if strategy == "linear_probe":
            state = train_probe(params, classes=classes, data=data, layout=layout, tokens=tokens, out_dir=out_dir,
                                method=method, device=device, self_training=self_training_grid,
                                embed_batch_size=embed_batch_size) if rank == 0 else {}
        else:
            model, state, val_proba[name] = train_transformer(params, strategy, classes=classes, data=data, layout=layout,
                                                              tokens=tokens, device=device, data_digest=data_digest,
                                                              backbone_dir=layout.adapted_dir, run_name=name)
            if rank == 0:
                save_transformer(model, tokenizer, out_dir, {**state, "adaptation": method}, tokens=tokens)
                shutil.rmtree(checkpoints_dir(layout) / name, ignore_errors=True)
        candidates[name] = ({**_candidate("transformer", out_dir, layout, state), "role": "adaptation",
                             "method": method, "reference": strategy} if rank == 0 else {})
    if rank == 0:
        t = params.train.tfidf
        pipeline, facts = select_tfidf(data["train_texts"], data["train_labels"], data["val_texts"], data["val_labels"],
                                       ngram_max=t.ngram_max, C=t.C, grid=t.C_grid, seed=params.seed)
        state = {"strategy": "tfidf", "classes": classes, "ngram_max": t.ngram_max, **facts,
                 "vocabulary_size": len(pipeline.named_steps["tfidf"].vocabulary_)}
        save_tfidf(pipeline, layout.baselines_dir / "tfidf", state)
        candidates["tfidf"] = {**_candidate("tfidf", layout.baselines_dir / "tfidf", layout, state), "role": "baseline"}
    # The proposal is made on validation only; ties go to the strategy listed first, then to
    # not adapting (adaptation candidates come after every strategy).
    transfer = [*params.train.strategies, *(adaptation_candidate(strategy, method) for method, strategy in plan)]
    proposed = (max(transfer, key=lambda s: (candidates[s]["best_val_accuracy"], -transfer.index(s)))
                if rank == 0 else None)
    if world > 1:
        box = [proposed]
        dist.broadcast_object_list(box, src=0)  # every rank trains the proposed strategy's other seeds
        proposed = box[0]
    if proposed in params.train.strategies:
        seeds = train_seeds(params, proposed, classes=classes, data=data, layout=layout, tokens=tokens, device=device,
                            data_digest=data_digest, tokenizer=tokenizer)
    else:  # an adaptation candidate: its seeds are not retrained (the verdict is the base seed's)
        seeds = {"strategy": proposed, "base_seed": params.seed, "requested": params.train.seeds, "models": {},
                 "note": "the proposed candidate is an adaptation candidate: not retrained with other seeds"}
    if world > 1:
        dist.barrier()
    if rank != 0:
        return {}
    report = {"device": device.type, "world_size": world, "torch": torch.__version__, "classes": classes,
              "max_length": tokens.max_length, "truncation": tokens.truncation, "inference": tokens.inference,
              "candidates": candidates, "proposed": proposed, "seeds": seeds}
    write_candidates(layout, transfer, candidates, proposed, classes, seeds=seeds)
    write_val_predictions(layout, val_df["id"].astype(str).to_numpy(), val_proba)
    write_json(layout.train_report, report)
    return report


MANIFEST_KEYS = ("kind", "path", "strategy", "role", "best_val_accuracy", "best_epoch")
ADAPTATION_KEYS = ("method", "reference")


def adaptation_candidate(strategy: str, method: str) -> str:
    """The candidate `strategy` trained with adaptation `method`, e.g. linear_probe_mlm."""
    return f"{strategy}_{method}"


def write_candidates(layout: Layout, strategies: list[str], candidates: dict, proposed: str, classes: list[str], *,
                     seeds: dict | None = None) -> None:
    """The deterministic part of the report, inside models/finetuned (what evaluate and register
    read), and no folder of a strategy that is no longer trained (outputs persist between runs)."""
    for folder in layout.finetuned_dir.iterdir():
        if folder.is_dir() and folder.name not in [*strategies, layout.seed_models_dir.name]:
            shutil.rmtree(folder)
    manifest = {"classes": classes, "proposed": proposed,
                "candidates": {name: {**{k: c.get(k) for k in MANIFEST_KEYS}, **{k: c[k] for k in ADAPTATION_KEYS if k in c}}
                               for name, c in candidates.items()}}
    if seeds is not None:
        manifest["seeds"] = {**seeds, "models": {s: {k: c.get(k) for k in ("path", "best_val_accuracy", "best_epoch")}
                                                 for s, c in seeds["models"].items()}}
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
    for seed, run in report.get("seeds", {}).get("models", {}).items():
        print(f"train: {report['proposed']} seed {seed}: {run.get('seconds')}s, "  # noqa: T201
              f"best val accuracy {run['best_val_accuracy']:.4f}")
    if report:
        print(f"train: proposed {report['proposed']} (best on validation)")  # noqa: T201
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
