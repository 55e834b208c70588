"""The model users load from the registry: texts in, labels and class probabilities out.

MLflow logs this file as "model from code" (`mlflow.pyfunc.log_model(python_model=<this file>)`),
so nothing is pickled: loading runs this code and reads safetensors weights from the model
folder artifact. It imports only what the pinned serving requirements install, and
graft/truncation.py (standard library only), which register logs beside it as code
(`registry.SERVING_CODE_PATHS`): `mlflow models serve` works in any environment that has them,
graft installed or not.

What a model folder needs to be served the way evaluate scored it is in the folder itself:
`graft_serving.json` (written by train beside the weights) names the tokenization (max_length,
truncation: which tokens of a longer text are kept, `keep`: head, tail or head_tail; padding
side), the inference mode the forward passes run in (fp32, bf16, int8, bf16_compiled: graft/precision.py,
logged beside this file too; absent means fp32), the head (the model's own sequence-classification head, or a linear probe over
mean-pooled embeddings, L2-normalised first where `normalize` says so (the setfit strategy's
sentence-transformers body), and its weights file) and the labels in order. Serving reads it and never
guesses: a folder without it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

try:  # in graft's own processes (train, evaluate, register's parity check)
    from graft.precision import MODES as INFERENCE_MODES
    from graft.precision import context as inference_context
    from graft.precision import device_for, prepare
    from graft.truncation import TRUNCATIONS, tokenize
except ModuleNotFoundError:  # served without graft: the files are logged with the model as code (registry.log_model)
    from precision import MODES as INFERENCE_MODES
    from precision import context as inference_context
    from precision import device_for, prepare
    from truncation import TRUNCATIONS, tokenize

TEXT_COLUMN = "text"
MODEL_ARTIFACT = "model"
BATCH_SIZE = 32

SERVING_FILE = "graft_serving.json"
# 2: `truncation.keep` (head, tail, head_tail) says which tokens of a longer text are kept
SERVING_FORMAT = 2
# the model's own `*ForSequenceClassification` head (its pooling is the model's: BERT's pooler over [CLS])
SEQUENCE_CLASSIFICATION = "sequence_classification"
# a linear head (`weight`, `bias` in a safetensors file) over the mean-pooled last hidden state
LINEAR_PROBE = "linear_probe"
HEAD_POOLING = {SEQUENCE_CLASSIFICATION: "model", LINEAR_PROBE: "mean"}
# what the tokenizer is called with for `keep: head`, in train and evaluate (graft.modeling.tokenize,
# graft.truncation.tokenize) and here; `tail` and `head_tail` cut the untruncated ids in graft.truncation
TRUNCATION_STRATEGY = "longest_first"


class ServingDescriptionError(ValueError):
    """A model folder whose serving description is missing or does not fit its files."""


def probability_column(label: str) -> str:
    return f"probability_{label}"


def describe(*, labels: list[str], max_length: int, truncation: str, tokenizer, head: str,
             head_file: str | None = None, inference: str = "fp32", normalize: bool = False) -> dict:
    """What serving needs to reproduce evaluate's scoring of a model folder (train writes it)."""
    if head not in HEAD_POOLING:
        raise ValueError(f"head {head!r}: expected one of {sorted(HEAD_POOLING)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r}: expected one of {list(TRUNCATIONS)}")
    if inference not in INFERENCE_MODES:
        raise ValueError(f"inference {inference!r}: expected one of {list(INFERENCE_MODES)}")
    description = {
        "format": SERVING_FORMAT,
        "labels": [str(label) for label in labels],
        "max_length": int(max_length),
        "truncation": {"strategy": TRUNCATION_STRATEGY, "side": tokenizer.truncation_side, "keep": truncation},
        "padding_side": tokenizer.padding_side,
        "head": {"kind": head, "pooling": HEAD_POOLING[head]},
        "inference": inference,
    }
    if head == LINEAR_PROBE:
        description["head"]["file"] = head_file
        if normalize:  # absent: not normalised (every probe folder written before setfit)
            description["head"]["normalize"] = True
    elif normalize:
        raise ValueError(f"normalize: only a {LINEAR_PROBE} head normalises its pooled embedding")
    return description


def head_file_normalizes(head_file: Path) -> bool:
    """What a probe head file's metadata says (graft.modeling.NORMALIZE_KEY; absent: false)."""
    from safetensors import safe_open

    with safe_open(str(head_file), framework="pt") as handle:
        return (handle.metadata() or {}).get("normalize") == "true"


def write_description(model_dir: Path, description: dict) -> None:
    (Path(model_dir) / SERVING_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def read_description(model_dir: Path) -> dict:
    """The folder's serving description, checked; ServingDescriptionError names what is wrong."""
    path = Path(model_dir) / SERVING_FILE
    if not path.is_file():
        raise ServingDescriptionError(
            f"{path}: missing: this model folder does not say how it was scored (max_length, truncation, "
            f"pooling, head), and serving does not guess; train it again with graft, which writes it")
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ServingDescriptionError(f"{path}: not readable as JSON ({err})") from None
    problems = []
    if not isinstance(description, dict) or description.get("format") != SERVING_FORMAT:
        raise ServingDescriptionError(f"{path}: format {description.get('format') if isinstance(description, dict) else None!r}, "
                                      f"expected {SERVING_FORMAT}")
    labels, max_length = description.get("labels"), description.get("max_length")
    truncation, head = description.get("truncation") or {}, description.get("head") or {}
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        problems.append("labels: expected a non-empty list of class names")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        problems.append(f"max_length: {max_length!r} is not a positive integer")
    if truncation.get("strategy") != TRUNCATION_STRATEGY:
        problems.append(f"truncation.strategy: {truncation.get('strategy')!r}, expected {TRUNCATION_STRATEGY!r}")
    if truncation.get("keep") not in TRUNCATIONS:
        problems.append(f"truncation.keep: {truncation.get('keep')!r}, expected one of {list(TRUNCATIONS)}")
    for key, value in (("truncation.side", truncation.get("side")), ("padding_side", description.get("padding_side"))):
        if value not in ("left", "right"):
            problems.append(f"{key}: {value!r}, expected 'left' or 'right'")
    if description.get("inference", "fp32") not in INFERENCE_MODES:
        problems.append(f"inference: {description.get('inference')!r}, expected one of {list(INFERENCE_MODES)}")
    kind = head.get("kind")
    if kind not in HEAD_POOLING:
        problems.append(f"head.kind: {kind!r}, expected one of {sorted(HEAD_POOLING)}")
    elif head.get("pooling") != HEAD_POOLING[kind]:
        problems.append(f"head.pooling: {head.get('pooling')!r}, a {kind} head pools {HEAD_POOLING[kind]!r}")
    elif kind == LINEAR_PROBE and not (isinstance(head.get("file"), str) and (Path(model_dir) / head["file"]).is_file()):
        problems.append(f"head.file: {head.get('file')!r} is not a file in the model folder")
    elif kind == LINEAR_PROBE and head.get("normalize", False) is not head_file_normalizes(Path(model_dir) / head["file"]):
        problems.append(f"head.normalize: {head.get('normalize', False)!r}, but {head['file']} says "
                        f"{head_file_normalizes(Path(model_dir) / head['file'])}")
    if problems:
        raise ServingDescriptionError(f"{path}: " + "; ".join(problems))
    return description


class TextClassifier(mlflow.pyfunc.PythonModel):
    """A graft model folder as a text classifier: `label`, its `probability`, one column per class."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts[MODEL_ARTIFACT]))

    def load(self, model_dir: Path) -> TextClassifier:
        """Tokenizer, weights and head from a local folder, scored as its serving description
        says (safetensors only; never a hub lookup)."""
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(model_dir)
        description = read_description(model_dir)
        self.labels = description["labels"]
        self.max_length = description["max_length"]
        self.truncation = description["truncation"]["keep"]
        self.inference = description.get("inference", "fp32")  # folders from before it existed ran fp32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.truncation_side = description["truncation"]["side"]
        self.tokenizer.padding_side = description["padding_side"]
        self._torch = torch
        if description["head"]["kind"] == SEQUENCE_CLASSIFICATION:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, use_safetensors=True, local_files_only=True).eval()
            config_labels = [str(self.model.config.id2label[i]) for i in range(self.model.config.num_labels)]
            if config_labels != self.labels:
                raise ServingDescriptionError(f"{model_dir / SERVING_FILE}: labels {self.labels} but config.json "
                                              f"has {config_labels}")
            self.model = prepare(self.model, self.inference)
            self.logits = lambda batch: self.forward(**batch).logits
        else:
            from safetensors.torch import load_file

            self.model = prepare(AutoModel.from_pretrained(model_dir, use_safetensors=True, local_files_only=True).eval(),
                                 self.inference)
            head = load_file(str(model_dir / description["head"]["file"]))
            weight, bias = head["weight"].float(), head["bias"].float()
            expected = (len(self.labels), self.model.config.hidden_size)
            if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
                raise ServingDescriptionError(
                    f"{model_dir / description['head']['file']}: head weight {tuple(weight.shape)}, bias "
                    f"{tuple(bias.shape)}; {len(self.labels)} labels over hidden size {expected[1]} need {expected}")

            normalize = description["head"].get("normalize", False)

            def logits(batch):  # the head in fp32 outside the mode, as evaluate applies it (numpy)
                hidden = self.forward(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                return pooled @ weight.T + bias

            self.logits = logits
        return self

    def forward(self, **batch):
        """The model's forward pass in the folder's inference mode (graft.precision), on the CPU."""
        with inference_context(device_for(self.inference, self._torch.device("cpu")), self.inference):
            return self.model(**batch)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                # what evaluate feeds the model: the same cut of the token ids, padded per batch, and the mask
                ids = tokenize(self.tokenizer, texts[start:start + BATCH_SIZE], max_length=self.max_length,
                               truncation=self.truncation)
                padded = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
                batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
                rows.append(torch.softmax(self.logits(batch).float(), dim=-1).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            column = TEXT_COLUMN if TEXT_COLUMN in model_input.columns else model_input.columns[0]
            texts = model_input[column].astype(str).tolist()
        else:  # a list of strings or a Series
            texts = [str(t) for t in model_input]
        proba = self.predict_proba(texts)
        best = proba.argmax(1) if len(texts) else np.zeros(0, dtype=int)
        out = pd.DataFrame({"label": [self.labels[i] for i in best],
                            "probability": proba[np.arange(len(texts)), best].astype(float)})
        for i, label in enumerate(self.labels):
            out[probability_column(label)] = proba[:, i].astype(float)
        return out


mlflow.models.set_model(TextClassifier())
