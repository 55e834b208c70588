"""The fine-tuning engine: transfer strategies, one training loop, exact resume, and DDP.

`fit()` is one loop that reads top to bottom (nanoGPT style). What makes it fast without
changing what it computes:
- the outputs of frozen layers (embeddings + lowest N blocks) are computed once, in eval mode
  (no dropout, so they are exactly what every epoch would recompute), and the trained upper
  blocks run on them;
- batches are grouped by length, so little padding is computed;
- validation runs every epoch and stops early when it stops improving;
- AdamW's fused kernel, on the CPU as on CUDA;
- on CUDA: bf16 autocast, SDPA attention (transformers' default), optional `torch.compile`.

The same code runs under `torchrun --nproc_per_node=N`: every rank walks the same global batch
order and takes its share of each global batch; the loss is normalised by the global batch, so
the update equals a single-process step on that batch (DDP averages over ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from graft.errors import GraftError
from graft.files import atomic_path, write_json
from graft.modeling import autocast, encoder_layers, freeze_lower_layers, step_precision, tokenize
from graft.precision import BF16_MODES

# Cached frozen-layer outputs above this size are recomputed instead (memory over speed).
MAX_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class FitSettings:
    """Everything `fit` needs besides the model and the data; part of the checkpoint fingerprint."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accumulation: int = 1
    max_length: int = 128
    truncation: str = "head"
    seed: int = 0
    patience: int | None = None
    cache_frozen: bool = True
    eval_batch_size: int = 64
    checkpoint_every: int = 0
    compile: bool = False
    precision: str = "auto"
    # the mode evaluate scores texts in (model.inference, resolved): validation runs in its
    # precision, so the validation probabilities evaluate reuses are scored as its test rows are
    inference: str = "fp32"


# AdamW's fused kernel (one pass over each tensor) where torch has it; on the CPU it took 79 ms a
# step over 7.4M parameters (the partial strategy's) against 218 ms for the default per-tensor loop,
# side by side on 2 cores. The Hugging Face Trainer's default optimizer (adamw_torch_fused) is the same.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


# ---------------------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _all_sum(value: float, device: torch.device) -> float:
    rank, world = dist_env()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# ------------------------------------------------------------------------------ strategies


def frozen_modules(model: PreTrainedModel, freeze_layers: int) -> list[torch.nn.Module]:
    """The embeddings and the lowest `freeze_layers` blocks (empty when nothing is frozen)."""
    if freeze_layers == 0:
        return []
    base = getattr(model, model.base_model_prefix, model)
    return [base.embeddings, *encoder_layers(model)[:freeze_layers]]


def layerwise_lr_groups(model: PreTrainedModel, *, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """Layer-wise LR decay (ULMFiT, ELECTRA): the head gets `lr`, each block below it `decay`
    times its upper neighbour's, the embeddings the smallest; general features move least."""
    layers = encoder_layers(model)
    depth = {id(p): 0 for p in getattr(model, model.base_model_prefix).embeddings.parameters()}
    for i, layer in enumerate(layers):
        depth.update({id(p): i + 1 for p in layer.parameters()})
    top = len(layers) + 1
    groups: dict[int, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(depth.get(id(p), top), []).append(p)
    return [{"params": ps, "lr": lr * decay ** (top - d), "weight_decay": weight_decay} for d, ps in sorted(groups.items())]


def apply_lora(model: PreTrainedModel, *, r: int, alpha: int, dropout: float) -> torch.nn.Module:
    """LoRA adapters on the attention query/value projections; pooler and head train fully."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=["query", "value"], modules_to_save=["pooler"])
    return get_peft_model(model, cfg)


def prepare_strategy(model: PreTrainedModel, strategy: str, *, freeze_layers: int, lr: float, weight_decay: float,
                     layer_decay: float = 1.0, lora: dict | None = None) -> tuple[torch.nn.Module, int, list[dict]]:
    """Freeze / adapt `model` for a strategy; return (model to train, frozen blocks, param groups)."""
    if strategy in ("partial", "scratch"):
        freeze_lower_layers(model, freeze_layers)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
        return model, freeze_layers, groups
    if strategy == "full":
        return model, 0, layerwise_lr_groups(model, lr=lr, decay=layer_decay, weight_decay=weight_decay)
    if strategy == "lora":
        peft_model = apply_lora(model, **(lora or {}))
        groups = [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
        return peft_model, 0, groups
    # imported here, not at the top: the training loop then imports without pydantic (graft.config's),
    # which a bare GPU machine lacks (benchmarks/gpu_check.py runs fit there)
    from graft.config import TRANSFER_STRATEGIES

    raise GraftError(f"train.strategies: unknown strategy {strategy!r}; choose from {TRANSFER_STRATEGIES}")


# ------------------------------------------------------------------------ batches and cache


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           group: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within windows of `group`
    batches, cut, shuffle the batches. Random enough to train on, with little padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


class _Passthrough(torch.nn.Module):
    """Stands in for the embeddings: the cached hidden states arrive as `inputs_embeds`."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        return inputs_embeds


@contextlib.contextmanager
def frozen_prefix_removed(model: PreTrainedModel, freeze_layers: int) -> Iterator[None]:
    """Run `model` from the output of its `freeze_layers`-th block: the model's own forward
    (mask handling, pooler, head) does the rest, so nothing of it is re-implemented here."""
    base = getattr(model, model.base_model_prefix)
    embeddings, layers = base.embeddings, base.encoder.layer
    base.embeddings, base.encoder.layer = _Passthrough(), torch.nn.ModuleList(list(layers)[freeze_layers:])
    try:
        yield
    finally:
        base.embeddings, base.encoder.layer = embeddings, layers


def frozen_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: Sequence[list[int]], *,
                   freeze_layers: int, batch_size: int, device: torch.device, desc: str) -> list[torch.Tensor]:
    """Hidden states after the frozen blocks, one unpadded (tokens, hidden) tensor per text."""
    base = getattr(model, model.base_model_prefix)
    layers = base.encoder.layer
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    base.encoder.layer = torch.nn.ModuleList(list(layers)[:freeze_layers])
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=1.0, leave=False):
                batch = order[start : start + batch_size]
                inputs = _collate_ids(tokenizer, [ids[i] for i in batch], device)
                with autocast(device):
                    hidden = base(**inputs).last_hidden_state
                for row, i in enumerate(batch):
                    out[i] = hidden[row, : len(ids[i])].float().cpu().clone()
    finally:
        base.encoder.layer = layers
    return out


def _collate_ids(tokenizer: PreTrainedTokenizerBase, items: Sequence[list[int]], device: torch.device) -> dict:
    batch = tokenizer.pad({"input_ids": list(items)}, return_tensors="pt")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _collate_hidden(items: Sequence[torch.Tensor], device: torch.device) -> dict:
    width = max(x.shape[0] for x in items)
    hidden = torch.zeros(len(items), width, items[0].shape[1])
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, x in enumerate(items):
        hidden[row, : x.shape[0]] = x
        mask[row, : x.shape[0]] = 1
    if device.type == "cuda":
        hidden, mask = hidden.pin_memory(), mask.pin_memory()
    return {"inputs_embeds": hidden.to(device, non_blocking=True), "attention_mask": mask.to(device, non_blocking=True)}


def validation_precision(inference: str) -> str:
    """The precision validation runs in for a model evaluate will score in `inference`: bf16
    autocast for bf16 and bf16_compiled (both bf16; a compile per epoch would not pay), fp32 for
    fp32 and int8 (a quantized copy every epoch would not either)."""
    return "bf16" if inference in BF16_MODES else "fp32"


def val_probabilities(model: torch.nn.Module, examples: Sequence, lengths: Sequence[int], *, collate,
                      batch_size: int, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Class probabilities over length-sorted batches, in the order of `examples`, in `precision`
    (`autocast`'s: bf16 or fp32)."""
    model.eval()
    out: np.ndarray | None = None
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            with autocast(device, precision):
                logits = model(**collate([examples[i] for i in batch])).logits
            proba = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.zeros((len(examples), proba.shape[1]), dtype=np.float32)
            out[batch] = proba
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# ------------------------------------------------------------------------------ checkpoints


def _snapshot(named: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in named}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": [v.tolist() if hasattr(v, "tolist") else v for v in np.random.get_state()],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(path: Path, *, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: dict, best_weights: dict[str, torch.Tensor] | None) -> None:
    """Trainable weights and best-so-far weights as safetensors; optimizer and scheduler state
    (plain tensors and numbers, read back with `weights_only=True`); counters, history and every
    rank's RNG state as JSON. Written as one folder, atomically; rank 0 writes."""
    rank, world = dist_env()
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if rank != 0:
        return
    tensors = {f"model.{k}": v for k, v in _snapshot(named).items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in (best_weights or {}).items()})
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**progress, "rng": rngs}))


def load_checkpoint(path: Path, *, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, scheduler: Any,
                    fingerprint: str) -> tuple[dict, dict[str, torch.Tensor] | None] | None:
    """Restore a checkpoint written for the same run (same fingerprint); None when there is none."""
    state_file = path / "state.json"
    if not state_file.exists():
        return None
    progress = json.loads(state_file.read_text())
    if progress.get("fingerprint") != fingerprint:
        tqdm.write(f"{path}: checkpoint of a different run (params, data or code changed); starting afresh")
        return None
    tensors = load_file(str(path / "weights.safetensors"))
    current = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    missing = {n for n, _ in named} - set(current)
    if missing:
        raise GraftError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:3]}...")
    _restore(named, current)
    states = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rank, _ = dist_env()
    _set_rng_state(progress.pop("rng")[rank])
    return progress, best


def _restore(named: Sequence[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in named:
            param.copy_(weights[name].to(param.device))


VAL_PROBA = "__val_proba__"


def fingerprint_of(*parts: Any) -> str:
    """A digest of everything that determines a run, so a checkpoint is only resumed by the same run."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------------------- the loop


def fit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    val_texts: Sequence[str],
    val_labels: np.ndarray,
    settings: FitSettings,
    param_groups: list[dict],
    device: torch.device,
    freeze_layers: int = 0,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    desc: str = "fit",
) -> dict:
    """Train `param_groups`; keep the best validation epoch's weights. Returns the history with
    per-epoch throughput (for reports/train.json and MLflow step metrics)."""
    s = settings
    rank, world = dist_env()
    if device.type == "cpu":
        # Denormal floats (below ~1e-38) appear in the gradients and Adam's state after a few
        # hundred steps and make every CPU op on them several times slower (measured: the second
        # epoch of the default fine-tune ran at 4.7 samples/s instead of 22). Flushing them to
        # zero changes nothing a float32 model can represent meaningfully.
        torch.set_flush_denormal(True)
    model.to(device)
    started = time.perf_counter()
    train_ids = tokenize(tokenizer, train_texts, s.max_length, s.truncation)
    val_ids = tokenize(tokenizer, val_texts, s.max_length, s.truncation)
    train_lengths, val_lengths = [len(x) for x in train_ids], [len(x) for x in val_ids]
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)

    # Frozen blocks run in eval mode (no dropout): then their outputs are the same every epoch,
    # and computing them once is exact rather than an approximation.
    frozen = frozen_modules(model, freeze_layers)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
    cache_bytes = 4 * hidden * (sum(train_lengths) + sum(val_lengths))
    cached = s.cache_frozen and freeze_layers > 0 and cache_bytes <= MAX_CACHE_BYTES
    if cached:
        for m in frozen:
            m.eval()
        train_x = frozen_outputs(model, tokenizer, train_ids, freeze_layers=freeze_layers,
                                 batch_size=s.eval_batch_size, device=device, desc=f"{desc} cache train")
        val_x = frozen_outputs(model, tokenizer, val_ids, freeze_layers=freeze_layers,
                               batch_size=s.eval_batch_size, device=device, desc=f"{desc} cache val")
        collate = partial(_collate_hidden, device=device)
    else:
        train_x, val_x = train_ids, val_ids
        collate = partial(_collate_ids, tokenizer, device=device)
    cache_seconds = time.perf_counter() - started

    optimizer = torch.optim.AdamW(param_groups, lr=s.lr, weight_decay=s.weight_decay,
                                  fused=device.type in FUSED_ADAMW_DEVICES)
    steps_per_epoch = math.ceil(len(train_ids) / s.batch_size)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(s.warmup_ratio * steps_per_epoch * s.epochs), steps_per_epoch * s.epochs
    )
    progress = {"fingerprint": fingerprint, "step": 0, "epoch": 1, "epoch_loss": 0.0, "history": [],
                "best_epoch": 0, "best_val_accuracy": -1.0, "bad_epochs": 0, "done": False}
    best_weights = None
    # names taken now, before the frozen prefix is cut out (which renumbers the blocks)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    resumed = load_checkpoint(checkpoint_dir, named=named, optimizer=optimizer, scheduler=scheduler,
                              fingerprint=fingerprint) if checkpoint_dir else None
    if resumed:
        progress, best_weights = resumed
        tqdm.write(f"{desc}: resuming at step {progress['step']} (epoch {progress['epoch']})")

    def checkpoint() -> None:
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, named=named, optimizer=optimizer, scheduler=scheduler,
                            progress=progress, best_weights=best_weights)

    trainable = [p for g in param_groups for p in g["params"]]
    with frozen_prefix_removed(model, freeze_layers) if cached else contextlib.nullcontext():
        step_model = model
        if s.compile:
            step_model = torch.compile(step_model)
        if world > 1:
            step_model = torch.nn.parallel.DistributedDataParallel(
                step_model, device_ids=[device.index] if device.type == "cuda" else None)
        epoch = progress["epoch"]
        while not progress["done"] and epoch <= s.epochs:
            # the batch order depends on (seed, epoch) only, so a resumed run walks the same one
            batches = length_grouped_batches(train_lengths, s.batch_size, torch.Generator().manual_seed(s.seed * 100003 + epoch))
            done_in_epoch = progress["step"] - (epoch - 1) * steps_per_epoch
            model.train()
            for m in frozen:
                m.eval()
            tick, samples, tokens = time.perf_counter(), 0, 0
            bar = tqdm(batches[done_in_epoch:], desc=f"{desc} epoch {epoch}/{s.epochs}", unit="step", mininterval=1.0,
                       disable=rank != 0)
            for batch in bar:
                # this rank's share of the global batch, cut into micro-batches for accumulation;
                # a rank left without examples runs one with weight 0 so DDP's all-reduce still meets
                mine = batch[rank::world]
                weight = 1.0 if mine else 0.0
                mine = mine or batch[:1]
                size = math.ceil(len(mine) / s.grad_accumulation)
                micro = [mine[i : i + size] for i in range(0, len(mine), size)]
                for k, part in enumerate(micro):
                    sync = k == len(micro) - 1 or world == 1
                    with contextlib.nullcontext() if sync else step_model.no_sync():
                        with autocast(device, step_precision(s.precision, device)):
                            logits = step_model(**collate([train_x[i] for i in part])).logits
                        targets = torch.as_tensor(train_labels[part], device=device)
                        # summed loss over the global batch size: the gradient is the global-batch
                        # mean whatever the accumulation; x world because DDP averages over ranks.
                        # fp32 even under bf16 autocast: small-batch cross-entropy is sensitive.
                        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum") * weight
                        (loss_sum * world / len(batch)).backward()
                    progress["epoch_loss"] += loss_sum.item()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] += 1
                samples += len(batch)
                tokens += sum(train_lengths[i] for i in batch)
                if s.checkpoint_every and progress["step"] % s.checkpoint_every == 0:
                    checkpoint()
            train_seconds = time.perf_counter() - tick

            val_proba = val_probabilities(model, val_x, val_lengths, collate=collate, batch_size=s.eval_batch_size,
                                          device=device, precision=validation_precision(s.inference))
            val_accuracy = float((val_proba.argmax(1) == val_labels).mean()) if len(val_x) else 0.0
            train_loss = _all_sum(progress["epoch_loss"], device) / len(train_ids)
            progress["history"].append({
                "epoch": epoch, "train_loss": train_loss, "val_accuracy": val_accuracy,
                "seconds": round(train_seconds, 3),
                "samples_per_s": round(samples / train_seconds, 2) if train_seconds > 0 else None,
                "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
            })
            if rank == 0:
                tqdm.write(f"{desc} epoch {epoch}: train loss {train_loss:.4f}, val accuracy {val_accuracy:.4f}")
            if val_accuracy > progress["best_val_accuracy"]:
                progress.update(best_epoch=epoch, best_val_accuracy=val_accuracy, bad_epochs=0)
                # the best epoch's val probabilities ride with its weights (checkpoints included)
                best_weights = {**_snapshot(named), VAL_PROBA: torch.from_numpy(val_proba)}
            else:
                progress["bad_epochs"] += 1
            epoch += 1
            stop = s.patience is not None and progress["bad_epochs"] >= s.patience
            progress.update(epoch=epoch, epoch_loss=0.0, done=stop or epoch > s.epochs)
            checkpoint()
    if device.type == "cpu":
        torch.set_flush_denormal(False)  # a process-wide switch: leave it as a library caller had it
    best_val_proba = None
    if best_weights is not None:
        best_val_proba = best_weights[VAL_PROBA].numpy() if VAL_PROBA in best_weights else None
        _restore(named, best_weights)
    history = progress["history"]
    return {
        "history": [{k: h[k] for k in ("epoch", "train_loss", "val_accuracy")} for h in history],
        "throughput": [{k: h[k] for k in ("epoch", "seconds", "samples_per_s", "tokens_per_s")} for h in history],
        "best_epoch": progress["best_epoch"],
        "best_val_accuracy": progress["best_val_accuracy"],
        "epochs_run": len(history),
        "stopped_early": len(history) < s.epochs,
        "frozen_cached": cached,
        "cache_seconds": round(cache_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "settings": asdict(s),
        "val_proba": best_val_proba,
    }


def fit_probe_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                   C: float | str, C_grid: Sequence[float], seed: int) -> tuple[Any, float, dict]:
    """The linear probe's logistic regression (lbfgs, max_iter 5000) on embeddings, C fixed or
    (`auto`) chosen on validation over `C_grid` (graft.baselines.select_C): (the fitted
    LogisticRegression, its val accuracy, the search). The setfit strategy fits its head so too."""
    from sklearn.linear_model import LogisticRegression

    from graft.baselines import select_C

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(train_x, train_y)

    return select_C(fit, lambda m: float((m.predict(val_x) == val_y).mean()), C=C, grid=C_grid)


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                       C: float | str, C_grid: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression on the cached mean-pooled embeddings (no backbone pass),
    with C fixed or (`auto`) chosen on validation over `C_grid` (graft.baselines.select_C).
    Returns (weight [classes, hidden], bias [classes], facts); a binary problem's single row w
    becomes rows [0, w], so softmax over the two logits is sklearn's sigmoid(w.x + b)."""
    started = time.perf_counter()
    probe, val_accuracy, search = fit_probe_head(train_x, train_y, val_x, val_y, C=C, C_grid=C_grid, seed=seed)
    weight, bias = probe.coef_, probe.intercept_
    if weight.shape[0] == 1:
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    facts = {"best_val_accuracy": val_accuracy, "history": [{"epoch": 1, "val_accuracy": val_accuracy}],
             "best_epoch": 1, **search, "seconds": round(time.perf_counter() - started, 3)}
    return weight.astype(np.float32), bias.astype(np.float32), facts


def write_training_state(path: Path, state: dict) -> None:
    """How a model was trained, without run facts (seconds, throughput): model folders stay
    byte-identical for identical inputs; run facts go to reports/train.json."""
    run_facts = {"seconds", "throughput", "cache_seconds"}
    write_json(path, {k: v for k, v in state.items() if k not in run_facts})
