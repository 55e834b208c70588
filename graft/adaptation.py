"""Domain adaptation with unlabelled target-domain text: continued masked-LM pretraining of the
backbone (task-/domain-adaptive pretraining, Gururangan et al. 2020, "Don't Stop Pretraining")
and self-training of the linear probe on pseudo-labels (threshold and rounds chosen on validation)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from graft.errors import GraftError
from graft.modeling import _transformers_load_report_silenced, length_sorted_batches, tokenize
from graft.training import train_linear_probe


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, *, mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: `probability` of the real tokens are predicted; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (inputs, labels with -100 where not predicted)."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    replaced = chosen & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    inputs[replaced] = mask_id
    randomised = chosen & ~replaced & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    inputs[randomised] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomised]
    return inputs, labels


def load_masked_lm(model_dir: Path, *, trust_remote_code: bool) -> tuple[torch.nn.Module, list[str]]:
    """The backbone with its masked-LM head; the head's weights the folder lacks (sentence-
    transformers checkpoints carry none) are initialised, and returned by name."""
    with _transformers_load_report_silenced():
        model, info = AutoModelForMaskedLM.from_pretrained(model_dir, use_safetensors=True, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
    return model, sorted(info.get("missing_keys", []))


def _lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The masked-LM head when it is one module beside the encoder (BERT's `cls`, MPNet's and
    RoBERTa's `lm_head`); None when it is not (DistilBERT's is three), and the model's own loss
    over every position is used instead."""
    heads = [m for name, m in model.named_children() if name != model.base_model_prefix]
    return heads[0] if len(heads) == 1 else None


def masked_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """The masked-LM cross-entropy, the vocabulary projection computed at the masked positions
    only (about 15% of them): the same loss as `model(..., labels=labels).loss`, without the
    (tokens x vocabulary) logits of every position."""
    head = _lm_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask)[0]
    chosen = labels != -100
    logits = head(hidden[chosen])
    return torch.nn.functional.cross_entropy(logits.float(), labels[chosen])


def _masked_batches(tokenizer, ids, batches, order, *, mask_probability, generator):
    for b in order:
        batch = tokenizer.pad({"input_ids": [ids[i] for i in batches[b]]}, return_tensors="pt")
        special = torch.tensor([tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                for row in batch["input_ids"].tolist()], dtype=torch.bool)
        special |= batch["attention_mask"] == 0
        inputs, labels = mask_tokens(batch["input_ids"], special, mask_id=tokenizer.mask_token_id,
                                     vocab_size=len(tokenizer), probability=mask_probability, generator=generator)
        if (labels != -100).any():  # else nothing masked in this batch (short texts): no loss to learn from
            yield inputs, batch["attention_mask"], labels


def _run_epochs(model, tokenizer, ids, batches, *, epochs, params, lr, mask_probability, generator, device,
                desc) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, epochs * len(batches))
    losses = []
    for epoch in range(1, epochs + 1):
        total = 0.0
        order = torch.randperm(len(batches), generator=generator).tolist()
        steps = _masked_batches(tokenizer, ids, batches, order, mask_probability=mask_probability, generator=generator)
        for inputs, attention_mask, labels in tqdm(steps, total=len(order), desc=f"{desc} {epoch}/{epochs}",
                                                   unit="step", mininterval=1.0, leave=False):
            loss = masked_lm_loss(model, inputs.to(device), attention_mask.to(device), labels.to(device))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        losses.append(total / max(len(batches), 1))
    return losses


def mlm_pretrain(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, epochs: int,
                 lr: float, batch_size: int, mask_probability: float, max_length: int, seed: int,
                 device: torch.device, truncation: str = "head", head_warmup_epochs: int = 0,
                 head_warmup_lr: float = 1e-3) -> dict:
    """Continued masked-LM pretraining: AdamW, linear decay to zero, batches of similar length
    in a seeded order. First, `head_warmup_epochs` epochs train the masked-LM head alone (the
    encoder frozen), so that a head the checkpoint lacked (initialised at random) does not
    send random gradients into the pretrained encoder. Returns the mean loss per epoch."""
    if tokenizer.mask_token_id is None:
        raise GraftError("the backbone's tokenizer has no mask token: masked-LM adaptation needs one")
    ids = tokenize(tokenizer, texts, max_length, truncation)
    batches = length_sorted_batches([len(i) for i in ids], batch_size)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    started = time.perf_counter()
    common = {"mask_probability": mask_probability, "generator": generator, "device": device}
    warmup = []
    if head_warmup_epochs:
        encoder = getattr(model, model.base_model_prefix)
        frozen = [p for p in encoder.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            warmup = _run_epochs(model, tokenizer, ids, batches, epochs=head_warmup_epochs, lr=head_warmup_lr,
                                 params=[p for p in model.parameters() if p.requires_grad], desc="masked-LM head warm-up",
                                 **common)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    losses = _run_epochs(model, tokenizer, ids, batches, epochs=epochs, lr=lr, params=list(model.parameters()),
                         desc="masked-LM epoch", **common)
    model.eval()
    return {"epoch_loss": losses, "head_warmup_loss": warmup, "texts": len(texts),
            "steps": (head_warmup_epochs + epochs) * len(batches), "seconds": round(time.perf_counter() - started, 2)}


def adapted_encoder(masked_lm: torch.nn.Module, pretrained_dir: Path, *, trust_remote_code: bool) -> torch.nn.Module:
    """The pretrained encoder (pooler included: a masked-LM model has none) with the adapted
    weights of the masked-LM model's encoder put in."""
    with _transformers_load_report_silenced():
        encoder = AutoModel.from_pretrained(pretrained_dir, use_safetensors=True, trust_remote_code=trust_remote_code)
    adapted = getattr(masked_lm, masked_lm.base_model_prefix).state_dict()
    missing, unexpected = encoder.load_state_dict(adapted, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise GraftError(f"{pretrained_dir}: the masked-LM encoder does not match the backbone "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return encoder


def self_train_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                     unlabelled_x: np.ndarray, *, thresholds: Sequence[float], max_rounds: int, C: float | str,
                     C_grid: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Self-training of the linear probe: fit on train, pseudo-label the unlabelled embeddings
    whose top probability reaches the threshold, refit on train + pseudo-labels, repeat. Every
    (threshold, round) is scored on validation; the best is kept, ties to the plain probe
    (round 0) and then to fewer rounds. Returns (weight, bias, facts with the whole grid)."""
    weight, bias, facts = train_linear_probe(train_x, train_y, val_x, val_y, C=C, C_grid=C_grid, seed=seed)
    C = facts["C"]  # chosen (auto) on validation for the plain probe, then kept for every round
    best = {"threshold": None, "rounds": 0, "val_accuracy": facts["best_val_accuracy"], "pseudo_labels": 0}
    chosen = (weight, bias)
    grid = [dict(best)]
    for threshold in thresholds:
        w, b = weight, bias
        for round_ in range(1, max_rounds + 1):
            proba = softmax(unlabelled_x @ w.T + b, axis=1)
            keep = proba.max(1) >= threshold
            x = np.concatenate([train_x, unlabelled_x[keep]])
            y = np.concatenate([train_y, proba.argmax(1)[keep]])
            w, b, f = train_linear_probe(x, y, val_x, val_y, C=C, C_grid=C_grid, seed=seed)
            point = {"threshold": float(threshold), "rounds": round_, "val_accuracy": f["best_val_accuracy"],
                     "pseudo_labels": int(keep.sum())}
            grid.append(point)
            if (point["val_accuracy"], -point["rounds"]) > (best["val_accuracy"], -best["rounds"]):
                best, chosen = point, (w, b)
    return chosen[0], chosen[1], {"best_val_accuracy": best["val_accuracy"], "history": [
        {"epoch": 1, "val_accuracy": best["val_accuracy"]}], "best_epoch": 1, "C": C, "chosen": best, "grid": grid,
        "plain_val_accuracy": facts["best_val_accuracy"], "unlabelled_texts": int(len(unlabelled_x))}
