"""Model plumbing shared by the stages: devices, loading (safetensors only), batching, pooling."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from graft import precision as infer
from graft.errors import GraftError
from graft.precision import cpu_has_native_bf16  # noqa: F401 (graft.modeling's name for it, used by the benchmarks)
from graft.truncation import tokenize as truncate_tokenize


def seed_everything(seed: int) -> None:
    """Seed every RNG that touches training, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass in training: `auto`: bf16 on a GPU, full precision on
    the CPU (the frozen-output cache uses it so; validation runs in the precision of the mode
    evaluate scores in, graft.training.validation_precision); `bf16`: bf16 autocast on either;
    `fp32`: none. Training steps pass `step_precision(train.precision, device)`. Scoring texts
    follows `model.inference` (graft.inference)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("auto", "bf16", "fp32"):
        raise GraftError(f"precision {precision!r}: expected auto, bf16 or fp32")
    return contextlib.nullcontext()


def step_precision(precision: str, device: torch.device) -> str:
    """What `train.precision` means for a training step (forward and backward; never the cached
    frozen outputs or validation, which stay at `autocast(device)`): auto is bf16 on a GPU and on a
    CPU with native bf16 (AVX512-BF16 or AMX), else fp32. On such a CPU bf16 steps were 1.22-1.43x
    fp32 at the same validation accuracy: 9 pairs (BBC, kitchen, books x 3 seeds, the partial
    strategy, 250 labels), mean difference -0.09 points [-0.22, +0.05] (benchmarks/train_precision.py)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def load_encoder(model_dir: Path, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The bare backbone, weights from safetensors only (a pickle file is never loaded)."""
    return AutoModel.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=trust_remote_code)


def build_classifier(
    model_dir: Path, *, classes: Sequence[str], from_scratch: bool = False, trust_remote_code: bool = False,
    name: str = "classifier",
) -> PreTrainedModel:
    """Backbone + a new classification head; `from_scratch` keeps the architecture, not the weights.
    `name` (the strategy) starts the one line that says what the load did."""
    cfg = AutoConfig.from_pretrained(
        model_dir,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
        trust_remote_code=trust_remote_code,
    )
    if from_scratch:
        return AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=trust_remote_code)
    # transformers reports the new head as MISSING weights in a table that reads like an error;
    # graft expects it, says so in one line, and reports only what it did not expect
    with _transformers_load_report_silenced():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=cfg, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    for line in describe_head_load(model, info, name=name, classes=len(classes)):
        print(line, flush=True)  # noqa: T201
    return model


@contextlib.contextmanager
def _transformers_load_report_silenced():
    """transformers' loading report (a warning of `transformers.modeling_utils`), left out for one
    load. A filter, not a level: that logger's level switches another check's warnings on."""
    import logging

    def not_the_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(not_the_report)
    try:
        yield
    finally:
        report_logger.removeFilter(not_the_report)


def describe_head_load(model: PreTrainedModel, info: dict, *, name: str, classes: int) -> list[str]:
    """What loading the backbone under a new head did, in graft's words: the head (weights outside
    the backbone, newly initialised) is expected; a backbone weight missing from the checkpoint,
    a checkpoint weight left unused or a shape mismatch is not, and is named."""
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if not k.startswith(prefix)]
    backbone = [k for k in missing if k.startswith(prefix)]
    lines = [f"{name}: new classification head for {classes} classes" if head
             else f"{name}: classification head for {classes} classes loaded from the checkpoint"]

    def shown(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    if backbone:
        lines.append(f"{name}: warning: {len(backbone)} backbone weight(s) not in the checkpoint, newly initialised: "
                     f"{shown(backbone)}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        lines.append(f"{name}: warning: {len(unexpected)} checkpoint weight(s) not used by the model: {shown(unexpected)}")
    mismatched = sorted(str(k[0]) if isinstance(k, tuple | list) else str(k) for k in info.get("mismatched_keys") or [])
    if mismatched:
        lines.append(f"{name}: warning: {len(mismatched)} weight(s) of another shape in the checkpoint, newly "
                     f"initialised: {shown(mismatched)}")
    return lines


PROBE_HEAD_FILE = "probe_head.safetensors"
# the probe head file's metadata key: "true" when the mean-pooled embedding is L2-normalised before
# the linear layer (a sentence-transformers body ending in a Normalize module: the setfit strategy)
NORMALIZE_KEY = "normalize"


class MeanPoolingClassifier(torch.nn.Module):
    """A backbone, mean pooling (then L2 normalisation when `normalize`), and a linear head: the
    linear probe, or a setfit body and head, as a classifier.

    A `*ForSequenceClassification` head reads the [CLS] token (through the pooler), so a probe
    trained on mean-pooled embeddings cannot be written into one; this keeps the probe exact.
    It answers `model(**inputs).logits` and `model.config.num_labels` like a transformers
    classifier, so `predict_proba` serves it unchanged."""

    def __init__(self, encoder: PreTrainedModel, weight: torch.Tensor, bias: torch.Tensor, *,
                 normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.normalize = normalize
        self.classifier = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)

    # the head stays fp32 in every inference mode (graft.precision), as the served probe applies it
    fp32_modules = ("classifier",)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):
            pooled = mean_pool(hidden.float(), attention_mask)
            if self.normalize:  # sentence-transformers' Normalize: F.normalize(p=2, dim=1)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            logits = self.classifier(pooled)
        return SequenceClassifierOutput(logits=logits)


def save_probe_classifier(
    encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, weight: np.ndarray, bias: np.ndarray,
    *, classes: Sequence[str], out_dir: Path, also_write: Callable[[Path], None] | None = None,
    normalize: bool = False,
) -> None:
    """The backbone (safetensors), its tokenizer and the probe head (whether it normalises the
    pooled embedding in the head file's metadata), as one model folder; `also_write(folder)` adds
    files to it before it replaces `out_dir`."""
    from graft.files import atomic_path

    encoder.config.num_labels = len(classes)
    encoder.config.id2label = dict(enumerate(classes))
    encoder.config.label2id = {c: i for i, c in enumerate(classes)}
    with atomic_path(out_dir) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_file({"weight": torch.as_tensor(weight).contiguous(), "bias": torch.as_tensor(bias).contiguous()},
                  str(tmp / PROBE_HEAD_FILE), metadata={NORMALIZE_KEY: "true" if normalize else "false"})
        if also_write is not None:
            also_write(tmp)


def probe_head_normalizes(head_file: Path) -> bool:
    """Whether a probe head file says its pooled embedding is L2-normalised (absent: it is not)."""
    from safetensors import safe_open

    with safe_open(str(head_file), framework="pt") as handle:
        return (handle.metadata() or {}).get(NORMALIZE_KEY) == "true"


def load_classifier(model_dir: Path, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """A trained sequence classifier (ours, or a baseline), weights from safetensors only.
    A folder with a probe head is a mean-pooling linear probe over its backbone."""
    head = Path(model_dir) / PROBE_HEAD_FILE
    if head.exists():
        tensors = load_file(str(head))
        encoder = load_encoder(model_dir, trust_remote_code=trust_remote_code)
        return MeanPoolingClassifier(encoder, tensors["weight"], tensors["bias"], normalize=probe_head_normalizes(head))
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def encoder_layers(model: PreTrainedModel) -> Sequence[torch.nn.Module]:
    """The stack of transformer blocks of a BERT-family model."""
    base = getattr(model, model.base_model_prefix, model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise GraftError(f"{type(model).__name__}: cannot find encoder.layer; freezing needs a BERT-family encoder")
    return layers


def freeze_lower_layers(model: PreTrainedModel, freeze_layers: int) -> int:
    """Freeze the embeddings and the lowest `freeze_layers` blocks; return trainable parameter count."""
    layers = encoder_layers(model)
    if freeze_layers > len(layers):
        raise GraftError(f"train.freeze_layers={freeze_layers}, but the backbone has only {len(layers)} layers")
    if freeze_layers > 0:
        base = getattr(model, model.base_model_prefix, model)
        for module in [base.embeddings, *layers[:freeze_layers]]:
            for param in module.parameters():
                param.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so each batch holds texts of similar length (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
             truncation: str = "head") -> list[list[int]]:
    """Token ids per text, cut to `max_length` as `truncation` says (head, tail, head_tail:
    graft.truncation, which the served model uses too); padding happens per batch."""
    return truncate_tokenize(tokenizer, texts, max_length=max_length, truncation=truncation)


def collate(tokenizer: PreTrainedTokenizerBase, ids: Sequence[list[int]], device: torch.device) -> dict:
    batch = tokenizer.pad({"input_ids": list(ids)}, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _map_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[Sequence[int]],
    *,
    width: int,
    rows: Callable,
    batch_size: int,
    device: torch.device,
    desc: str,
    forward_kwargs: dict | None = None,
    inference: str = "fp32",
) -> np.ndarray:
    """Run `model` over token ids in length-sorted, dynamically padded batches; `rows(outputs,
    inputs)` gives one output row per sequence. The result is in the order of `ids`. `inference`
    (graft.precision): fp32, bf16 autocast, or int8 (a quantized copy, on the CPU)."""
    model, device = infer.prepare(model, inference), infer.device_for(inference, device)
    model.eval().to(device)
    out = np.zeros((len(ids), width), dtype=np.float32)
    batches = length_sorted_batches([len(x) for x in ids], batch_size)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", mininterval=1.0, leave=False):
            inputs = collate(tokenizer, [list(ids[i]) for i in batch], device)
            with infer.context(device, inference):
                outputs = model(**inputs, **(forward_kwargs or {}))
            out[batch] = rows(outputs, inputs).float().cpu().numpy()
    return out


def _map_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    width: int,
    rows: Callable,
    max_length: int,
    truncation: str,
    batch_size: int,
    device: torch.device,
    desc: str,
    inference: str = "fp32",
) -> np.ndarray:
    """`_map_ids` over texts, tokenized (and truncated) first."""
    return _map_ids(model, tokenizer, tokenize(tokenizer, texts, max_length, truncation), width=width, rows=rows,
                    batch_size=batch_size, device=device, desc=desc, inference=inference)


class MemoScorer:
    """Texts -> one row each (embeddings or class probabilities) from one model, computing each
    distinct token sequence once. Exact: the model sees token ids only, so texts that tokenize
    alike (a casing change under an uncased vocabulary, extra whitespace, an edit past the
    truncation point) share a row. Evaluation scores the test set, counterfactual swaps,
    perturbations and template probes through one of these per model."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, rows: Callable, width: int,
                 max_length: int, batch_size: int, device: torch.device, desc: str, truncation: str = "head",
                 inference: str = "fp32", token_ids: dict[str, tuple[int, ...]] | None = None) -> None:
        self.model, self.tokenizer, self.rows, self.width = infer.prepare(model, inference), tokenizer, rows, width
        self.inference = inference
        self.max_length, self.batch_size, self.device, self.desc = max_length, batch_size, device, desc
        self.truncation = truncation
        self.memo: dict[tuple[int, ...], np.ndarray] = {}
        # text -> its truncated token ids: each text is tokenized once (a fast tokenizer encodes the
        # whole text before it truncates), shared by scorers whose tokenizers agree (token_ids_cache)
        self.token_ids: dict[str, tuple[int, ...]] = {} if token_ids is None else token_ids
        self.forwarded = 0  # sequences that went through the model

    def keys(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """What the model sees of each text: its truncated token ids."""
        new = [t for t in dict.fromkeys(texts) if t not in self.token_ids]
        if new:
            ids = tokenize(self.tokenizer, new, self.max_length, self.truncation)
            self.token_ids.update(zip(new, map(tuple, ids), strict=True))
        return [self.token_ids[t] for t in texts]

    def seed(self, texts: Sequence[str], values: np.ndarray) -> None:
        """Rows already computed elsewhere (the features stage's embeddings) for these texts."""
        if len(texts) != len(values):
            raise GraftError(f"{self.desc}: {len(texts)} texts but {len(values)} precomputed rows")
        for key, row in zip(self.keys(texts), np.asarray(values, dtype=np.float32), strict=True):
            self.memo.setdefault(key, row)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = self.keys(texts)
        missing = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if missing:
            values = _map_ids(self.model, self.tokenizer, missing, width=self.width, rows=self.rows,
                              batch_size=self.batch_size, device=self.device, desc=self.desc,
                              inference=self.inference)
            self.memo.update(zip(missing, values, strict=True))
            self.forwarded += len(missing)
        if not keys:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.stack([self.memo[k] for k in keys])

    def changed(self, originals: Sequence[str], edited: Sequence[str]) -> np.ndarray:
        """Per pair, whether an edit changes what the model sees (its truncated token ids)."""
        return np.array([a != b for a, b in zip(self.keys(originals), self.keys(edited), strict=True)], dtype=bool)


def token_ids_cache(caches: dict[tuple, dict], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                    truncation: str) -> dict[str, tuple[int, ...]]:
    """The text -> token ids memo a MemoScorer with this tokenizer, length and truncation may share:
    one per tokenizer definition (its serialized vocabulary, normalizer and post-processor; a
    tokenizer without one gets its own), so the models of one evaluation tokenize each text once."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else id(tokenizer)
    return caches.setdefault((definition, max_length, truncation), {})


def _pooled(out, inputs) -> torch.Tensor:
    return mean_pool(out.last_hidden_state.float(), inputs["attention_mask"])


def _softmax(out, _inputs) -> torch.Tensor:
    return torch.softmax(out.logits.float(), dim=-1)


def embedding_scorer(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                     batch_size: int, device: torch.device, desc: str = "embed", truncation: str = "head",
                     inference: str = "fp32", token_ids: dict | None = None) -> MemoScorer:
    """Mean-pooled embeddings of a frozen backbone, memoised by token ids."""
    return MemoScorer(encoder, tokenizer, rows=_pooled, width=encoder.config.hidden_size, max_length=max_length,
                      batch_size=batch_size, device=device, desc=desc, truncation=truncation, inference=inference,
                      token_ids=token_ids)


def proba_scorer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                 batch_size: int, device: torch.device, desc: str = "predict", truncation: str = "head",
                 inference: str = "fp32", token_ids: dict | None = None) -> MemoScorer:
    """Class probabilities of a sequence classifier, memoised by token ids."""
    return MemoScorer(model, tokenizer, rows=_softmax, width=model.config.num_labels, max_length=max_length,
                      batch_size=batch_size, device=device, desc=desc, truncation=truncation, inference=inference,
                      token_ids=token_ids)


def embed(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    desc: str = "embed",
    truncation: str = "head",
    inference: str = "fp32",
) -> np.ndarray:
    """Mean-pooled embeddings of the frozen backbone, in the order of `texts`."""
    return _map_batches(
        encoder, tokenizer, texts, width=encoder.config.hidden_size,
        rows=_pooled,
        max_length=max_length, truncation=truncation, batch_size=batch_size, device=device, desc=desc,
        inference=inference,
    )


def predict_proba(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    desc: str = "predict",
    truncation: str = "head",
    inference: str = "fp32",
) -> np.ndarray:
    """Class probabilities of a sequence classifier, in the order of `texts`."""
    return _map_batches(
        model, tokenizer, texts, width=model.config.num_labels,
        rows=_softmax,
        max_length=max_length, truncation=truncation, batch_size=batch_size, device=device, desc=desc,
        inference=inference,
    )


def _pooled_layers(out, inputs) -> torch.Tensor:
    """Mean-pooled hidden states of the embeddings and of every block, side by side."""
    mask = inputs["attention_mask"]
    return torch.cat([mean_pool(hidden.float(), mask) for hidden in out.hidden_states], dim=-1)


def embed_layers(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    desc: str = "embed layers",
    truncation: str = "head",
) -> np.ndarray:
    """Mean-pooled hidden states of every layer, shape (layers + 1, texts, hidden): index 0 is the
    embedding layer's output, index i the output of block i; the last equals `embed`'s rows."""
    layers, hidden = encoder.config.num_hidden_layers + 1, encoder.config.hidden_size
    flat = _map_ids(encoder, tokenizer, tokenize(tokenizer, texts, max_length, truncation), width=layers * hidden,
                    rows=_pooled_layers, batch_size=batch_size, device=device, desc=desc,
                    forward_kwargs={"output_hidden_states": True})
    return np.ascontiguousarray(flat.reshape(len(texts), layers, hidden).transpose(1, 0, 2))
