"""Typed parameters: `params.yaml` loaded into one pydantic model and validated once.

Every problem is reported in one error, each line naming the key that is wrong.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML

from graft.errors import GraftError
from graft.files import atomic_write_text

PARAMS_FILE = Path("params.yaml")
_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = Field(description="File, folder, `package:NAME/sub/dir` or `hf:DATASET` to read.")
    revision: str | None = Field(None, description="Hub revision (git sha or tag) for `hf:` sources.")
    text_column: str = Field("text", description="Column that holds the input text.")
    label_column: str = Field("label", description="Column that holds the class label.")
    train_size: int = Field(250, gt=0, description="Labelled training rows (stratified).")
    val_size: int = Field(250, gt=0, description="Validation rows, used to pick checkpoints.")
    test_size: int | None = Field(None, gt=0, description="Test rows; null takes every remaining row.")


class ModelParams(_Section):
    ref: str = Field(description="`package:NAME/sub/dir`, a local folder, or a hub id.")
    revision: str | None = Field(None, description="Hub revision; pin it for reproducible runs.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub to run.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens kept per text.")


class FeatureParams(_Section):
    batch_size: int = Field(64, gt=0, description="Texts per forward pass when embedding.")


class ScratchParams(_Section):
    lr: float = Field(3e-4, gt=0, description="Learning rate of the random-init baseline.")
    epochs: int = Field(5, gt=0, description="Epochs of the random-init baseline.")


class TfidfParams(_Section):
    ngram_max: int = Field(2, ge=1, le=4, description="Longest word n-gram of the TF-IDF baseline.")
    C: float = Field(10.0, gt=0, description="Inverse L2 strength of its logistic regression.")


class TrainParams(_Section):
    freeze_layers: int = Field(2, ge=0, description="Lowest encoder layers kept frozen (with the embeddings).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate for the transferred model.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    epochs: int = Field(5, gt=0, description="Passes over the training split.")
    batch_size: int = Field(16, gt=0, description="Examples per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up.")
    scratch: ScratchParams = ScratchParams()
    tfidf: TfidfParams = TfidfParams()


class EvaluateParams(_Section):
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for confidence intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")


class GateParams(_Section):
    min_accuracy: float = Field(0.8, ge=0, le=1, description="Lowest test accuracy to register.")
    min_macro_f1: float = Field(0.8, ge=0, le=1, description="Lowest test macro-F1 to register.")
    require_positive_transfer: bool = Field(True, description="Refuse models that lose to a baseline.")


class PromotionParams(_Section):
    min_gain: float = Field(0.0, ge=0, le=1, description=(
        "The new version becomes `champion` only if its test accuracy exceeds the champion's by more "
        "than this (both predicted in the same run, on the same test split)."))
    verdicts: list[Literal["positive", "no_gain", "negative"]] = Field(["positive"], description=(
        "Transfer verdicts (reports/transfer.json) a version may have to become champion."))


class RegisterParams(_Section):
    model_name: str = Field("graft-classifier", min_length=1, description="Registered model name.")
    experiment: str = Field("graft", min_length=1, description="MLflow experiment of pipeline runs.")
    alias: str = Field("challenger", min_length=1, description="Alias set on every version that passes the gate.")
    promotion: PromotionParams = PromotionParams()


# `register` (the stage's section) shadows ABCMeta.register on the class, not on instances.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    seed: int = Field(0, ge=0, description="Seeds splitting, head init, shuffling and dropout.")
    data: DataParams
    model: ModelParams
    features: FeatureParams = FeatureParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    register: RegisterParams = RegisterParams()

    @field_validator("data")
    @classmethod
    def _columns_differ(cls, data: DataParams) -> DataParams:
        if data.text_column == data.label_column:
            raise ValueError("text_column and label_column must differ")
        return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif problem["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return f"{source}: {len(lines)} invalid parameter(s):\n" + "\n".join(lines)


def validate(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validate a parsed params mapping; raise one GraftError listing every problem."""
    if not isinstance(raw, dict):
        raise GraftError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise GraftError(_format_errors(err, source)) from None


def load(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`."""
    if not path.exists():
        raise GraftError(f"{path}: parameters file not found (run graft from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GraftError(f"{path}: not valid YAML: {err}") from None
    return validate(raw, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-5` -> (["train", "lr"], 3e-05); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise GraftError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(parsed, str) and _EXPONENT_NUMBER.match(parsed):
        parsed = float(parsed)  # YAML 1.1 reads `3e-5` (no dot) as a string; users mean the number
    return key.strip().split("."), parsed


def apply_overrides(overrides: list[str], path: Path = PARAMS_FILE, *, dry_run: bool = False) -> dict[str, Any]:
    """Write `KEY=VALUE` overrides into params.yaml (comments kept), after validating the result.

    Like `dvc exp run -S`, the override lands in the file DVC reads, so DVC sees the change
    and the run can be reproduced from git. Nothing is written when any override is invalid.
    Returns the applied overrides as {dotted key: value}; `dry_run` only validates.
    """
    if not overrides:
        return {}
    rt = YAML()
    rt.preserve_quotes = True
    # keep `null` spelled out, as in the file, so an override changes only its own line
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    applied: dict[str, Any] = {}
    unknown = []
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for part in keys[:-1]:
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if not isinstance(node, dict) or keys[-1] not in node:
            unknown.append(".".join(keys))
            continue
        node[keys[-1]] = value
        applied[".".join(keys)] = value
    if unknown:
        raise GraftError(f"{path}: unknown parameter key(s) in override: {', '.join(unknown)}")
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    validate(yaml.safe_load(buffer.getvalue()), f"{path} with overrides {overrides}")
    if not dry_run:
        atomic_write_text(path, buffer.getvalue())
    return applied
