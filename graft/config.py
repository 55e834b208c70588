"""Typed parameters: `params.yaml` loaded into one pydantic model and validated once.

Every problem is reported in one error, each line naming the key that is wrong. The fields carry
types, bounds and documentation but no defaults: `params.yaml` is the one place where defaults
live, so a key missing there is reported, never silently filled with a second default.
"""

from __future__ import annotations

import codecs
import io
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from graft.errors import GraftError
from graft.files import atomic_write_text

PARAMS_FILE = Path("params.yaml")
_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class _Section(BaseModel):
    # strict: `-S train.epochs=true` or `epochs: "5"` is an error, not 1 or 5
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    source: str = Field(description="File, folder, `package:NAME/sub/dir` or `hf:DATASET` to read.")
    revision: str | None = Field(description="Hub revision (git sha or tag) for `hf:` sources.")
    text_column: str = Field(description="Column that holds the input text.")
    label_column: str = Field(description="Column that holds the class label.")
    id_column: str = Field(description="Column of unique row ids; absent: ids are hashes of the text.")
    split_column: str | None = Field(
        description="Column holding train/val/test per row (the user's own split); sizes are then ignored."
    )
    group_columns: list[str] = Field(
        description="Columns carried into the splits for group metrics (e.g. gender)."
    )
    domain_column: str | None = Field(description="Column naming each row's domain, carried into the splits.")
    on_conflict: Literal["error", "drop"] = Field(
        description="The same text under two labels: `error`, or `drop` every copy of it."
    )
    encoding_fallback: str | None = Field(
        description="Codec for bytes that are not UTF-8 (e.g. cp1252); null refuses such files."
    )
    train_size: int = Field(gt=0, description="Labelled training rows (stratified).")
    val_size: int = Field(gt=0, description="Validation rows, used to pick checkpoints.")
    test_size: int | None = Field(gt=0, description="Test rows; null takes every remaining row.")
    unlabelled_source: str | None = Field(description=(
        "Unlabelled target-domain text for domain adaptation (same readers as `source`; only "
        "`text_column` is read, labels are ignored); null: none."))
    unlabelled_revision: str | None = Field(description="Hub revision for an `hf:` unlabelled_source.")

    @field_validator("encoding_fallback")
    @classmethod
    def _known_codec(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown codec {value!r}") from None
        return value


MIN_MAX_LENGTH, MAX_MAX_LENGTH = 8, 4096


class ModelParams(_Section):
    ref: str = Field(description="`package:NAME/sub/dir`, a local folder, or a hub id.")
    revision: str | None = Field(description="Hub revision; pin it for reproducible runs.")
    trust_remote_code: bool = Field(description="Allow model code from the hub to run.")
    max_length: int | Literal["auto"] = Field(description=(
        "Tokens kept per text (8 to 4096), or `auto`: chosen by the features stage from the train split's token "
        "lengths (graft/lengths.py: length_coverage under length_budget, capped by the backbone's positions)."))
    length_coverage: float = Field(gt=0, le=1, description=(
        "`max_length: auto`: the share of train texts that must fit untruncated (before the budget and the cap)."))
    length_budget: int = Field(ge=8, le=4096, description=(
        "`max_length: auto`: the most mean tokens per train text after truncation (what compute per epoch grows "
        "with, at least linearly, under length-grouped batches); auto lowers its choice until it fits."))
    truncation: Literal["head", "tail", "head_tail"] = Field(description=(
        "Tokens kept of a longer text: head (its start), tail (its end), or head_tail (the first quarter and the "
        "last three quarters of the window, Sun et al. 2019)."))
    candidates: list[str] = Field(description=(
        "More backbones (refs like model.ref, at their newest revision) ranked beside model.ref by the select "
        "stage's transferability scores; empty: model.ref only."))
    inference: Literal["auto", "fp32", "bf16", "int8", "bf16_compiled"] = Field(description=(
        "Precision of the forward passes that score texts (features, the probe's embeddings, evaluate and the "
        "served model; never training): fp32, bf16 (autocast), int8 (dynamic quantization, CPU), bf16_compiled "
        "(a bf16 copy compiled by torch.compile: fastest, after a compile in each process that scores), or auto: "
        "the features stage measures each mode this machine runs natively against fp32 on validation and picks, "
        "of those that pass, the one that embeds its texts soonest, compiling only for a large workload "
        "(graft/inference.py); reports/inference.json says what it chose and why."))
    select: Literal["auto", "ref"] = Field(description=(
        "auto: the best-ranked candidate (LogME on layer-averaged features) whose estimated fine-tuning time "
        "fits train.budget_seconds; ref: model.ref whatever the scores."))

    @field_validator("max_length", mode="before")
    @classmethod
    def _length_or_auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_MAX_LENGTH <= value <= MAX_MAX_LENGTH:
            raise ValueError(f"expected a number of tokens from {MIN_MAX_LENGTH} to {MAX_MAX_LENGTH}, or auto")
        return value


class FeatureParams(_Section):
    batch_size: int = Field(gt=0, description="Texts per forward pass when embedding.")


class ScratchParams(_Section):
    lr: float = Field(gt=0, description="Learning rate of the random-init baseline.")
    epochs: int = Field(gt=0, description="Epochs of the random-init baseline.")


PositiveFloat = Annotated[float, Field(gt=0)]
C_DESCRIPTION = ("Inverse L2 strength of {what}: a number, or auto: each value of C_grid is fitted on train "
                 "and the best validation accuracy wins (ties: the smaller C, the stronger regularisation).")


def _increasing(grid: list[float]) -> list[float]:
    if sorted(set(grid)) != list(grid):
        raise ValueError("must list distinct values in increasing order")
    return grid


class TfidfParams(_Section):
    ngram_max: int = Field(ge=1, le=4, description="Longest word n-gram of the TF-IDF baseline.")
    C: Literal["auto"] | PositiveFloat = Field(description=C_DESCRIPTION.format(what="its logistic regression"))
    C_grid: list[PositiveFloat] = Field(min_length=1, max_length=50,
                                        description="The values of C tried on validation when C is auto (increasing).")

    @field_validator("C_grid")
    @classmethod
    def _grid_increasing(cls, grid: list[float]) -> list[float]:
        return _increasing(grid)


class FullParams(_Section):
    lr: float = Field(gt=0, description="Head learning rate of full fine-tuning; lower blocks get less.")
    layer_decay: float = Field(gt=0, le=1, description="LR factor per block downwards (layer-wise decay).")
    epochs: int = Field(gt=0, description="Epochs of full fine-tuning.")


class LoraParams(_Section):
    lr: float = Field(gt=0, description="Learning rate of the LoRA adapters and the head.")
    r: int = Field(gt=0, description="Rank of the LoRA update matrices.")
    alpha: int = Field(gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(ge=0, lt=1, description="Dropout on the LoRA branch input.")
    epochs: int = Field(gt=0, description="Epochs of LoRA fine-tuning.")


class _CSearch(_Section):
    """A logistic regression's C grid, searched on validation when its C is auto."""

    C_grid: list[PositiveFloat] = Field(min_length=1, max_length=50,
                                        description="The values of C tried on validation when C is auto (increasing).")

    @field_validator("C_grid")
    @classmethod
    def _grid_increasing(cls, grid: list[float]) -> list[float]:
        return _increasing(grid)


class ProbeParams(_CSearch):
    C: Literal["auto"] | PositiveFloat = Field(
        description=C_DESCRIPTION.format(what="the linear probe on cached embeddings"))


class SetfitParams(_CSearch):
    lr: float = Field(gt=0, description="`setfit`: learning rate of the sentence-transformer body (contrastive phase).")
    epochs: int = Field(gt=0, le=100, description="`setfit`: passes over the contrastive pairs.")
    batch_size: int = Field(gt=0, description="`setfit`: text pairs per step of the contrastive phase.")
    num_iterations: int = Field(gt=0, le=100, description=(
        "`setfit`: pairs drawn per train text and iteration (one positive, one negative): 2 x num_iterations x "
        "train rows pairs per epoch, so the cost grows linearly with the rows (setfit's own default, all pairs, "
        "grows with their square)."))
    C: Literal["auto"] | PositiveFloat = Field(
        description=C_DESCRIPTION.format(what="the logistic-regression head on the fine-tuned body's embeddings"))


TRANSFER_STRATEGIES = ("linear_probe", "partial", "full", "lora", "setfit")
# strategies adapt.strategy may fine-tune from the MLM-adapted backbone
ADAPTABLE_STRATEGIES = ("linear_probe", "partial", "full", "lora")


class TrainParams(_Section):
    strategies: list[str] = Field(
        min_length=1,
        description="Transfer strategies to train (linear_probe, partial, full, lora, setfit); each is a candidate.",
    )
    freeze_layers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(description=(
        "`partial`: lowest encoder layers kept frozen (with the embeddings). auto: every block up to the layer "
        "whose features score best (LogME, select stage), at most layers - 1."))
    budget_seconds: float | None = Field(gt=0, description=(
        "model.select auto: fine-tune only a candidate whose estimated training time (its measured forward "
        "seconds per row x rows x epochs x 3 for the backward pass) fits; null: no limit."))
    lr: float = Field(gt=0, description="`partial`: AdamW learning rate.")
    weight_decay: float = Field(ge=0, description="AdamW weight decay.")
    epochs: int = Field(gt=0, description="`partial`: passes over the training split.")
    batch_size: int = Field(gt=0, description="Examples per optimizer step (the global batch under torchrun).")
    grad_accumulation: int = Field(gt=0, description="Micro-batches per optimizer step (same update, less memory).")
    warmup_ratio: float = Field(ge=0, lt=1, description="Share of steps with linear warm-up.")
    patience: int | None = Field(gt=0, description="Stop after this many epochs without a better val accuracy; null: never.")
    cache_frozen: bool = Field(description="Compute frozen layers' outputs once and reuse them (exact).")
    checkpoint_every: int = Field(ge=0, description="Also checkpoint every N optimizer steps (0: at epoch ends only).")
    compile: bool = Field(description="torch.compile the trained model (pays off on long GPU runs).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        description="Training steps' precision: auto (bf16 autocast on a GPU and on a CPU with native bf16, "
                            "AVX512-BF16 or AMX; fp32 on other CPUs), fp32, or bf16 (autocast wherever it runs, "
                            "emulated and slow on other CPUs). The cached frozen outputs, validation and evaluation "
                            "never follow it.")
    nproc_per_node: int = Field(gt=0, description="Processes to launch with torchrun (DDP); 1 runs in-process.")
    full: FullParams = Field(description="The `full` strategy: every weight trained, layer-wise LR decay.")
    lora: LoraParams = Field(description="The `lora` strategy: low-rank adapters, merged on save.")
    probe: ProbeParams = Field(description="The `linear_probe` strategy on cached embeddings.")
    setfit: SetfitParams = Field(description=(
        "The `setfit` strategy: contrastive fine-tuning of the body (the setfit library), then a "
        "logistic-regression head, folded into a mean-pooling classifier on save."))
    scratch: ScratchParams = Field(description="The from-scratch baseline (same architecture, random init).")
    tfidf: TfidfParams = Field(description="The TF-IDF + logistic regression baseline.")
    seeds: int = Field(ge=1, le=20, description=(
        "Seeds the proposed strategy is trained with: the base seed (the registered model) and seed+1.."
        "seed+N-1, each scored on test; the verdict must hold across them (1: the base seed only)."))

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, strategies: list[str]) -> list[str]:
        unknown = [s for s in strategies if s not in TRANSFER_STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose from {list(TRANSFER_STRATEGIES)}")
        if len(set(strategies)) != len(strategies):
            raise ValueError("strategies are listed more than once")
        return strategies

    @model_validator(mode="after")
    def _setfit_in_one_process(self) -> TrainParams:
        if "setfit" in self.strategies and self.nproc_per_node > 1:
            raise ValueError("strategies has setfit, which trains in one process (setfit's Trainer, no DDP "
                             "here): set nproc_per_node to 1")
        return self


class MlmParams(_Section):
    epochs: int = Field(gt=0, le=100, description="Passes of masked-LM continued pretraining over the texts.")
    lr: float = Field(gt=0, description="AdamW learning rate of masked-LM pretraining.")
    mask_probability: float = Field(gt=0, lt=1, description="Share of tokens masked (BERT: 0.15).")
    max_texts: int = Field(gt=0, description="Most unlabelled texts used (a seeded sample), before the train texts are added.")
    batch_size: int = Field(gt=0, description="Texts per masked-LM step.")
    head_warmup_epochs: int = Field(ge=0, le=100, description=(
        "When the backbone's folder has no masked-LM head (sentence-transformers checkpoints), epochs that train the "
        "initialised head alone, the encoder frozen, before continued pretraining; 0: none."))
    head_warmup_lr: float = Field(gt=0, description="AdamW learning rate of the head warm-up.")


class SelfTrainingParams(_Section):
    thresholds: list[float] = Field(min_length=1, description=(
        "Confidences above which a pseudo-label is kept; the best on validation is chosen."))
    max_rounds: int = Field(gt=0, le=10, description="Most pseudo-labelling rounds; the best round on validation is chosen.")

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, thresholds: list[float]) -> list[float]:
        if any(not 0 < t < 1 for t in thresholds):
            raise ValueError("every threshold must lie strictly between 0 and 1")
        return thresholds


class AdaptParams(_Section):
    methods: list[Literal["mlm", "self_training"]] = Field(description=(
        "Domain adaptation on data.unlabelled_source, each an extra candidate with its own verdict "
        "against not adapting: mlm (continued masked-LM pretraining, the adapt stage), self_training "
        "(pseudo-labels, on the linear probe). Empty: off."))
    strategy: str = Field(description=(
        "Strategy fine-tuned from the MLM-adapted backbone; the same strategy from the pretrained "
        "backbone (it must be in train.strategies) is the reference of the verdict."))
    mlm: MlmParams = Field(description="Masked-LM continued pretraining (the adapt stage).")
    self_training: SelfTrainingParams = Field(description="Self-training of the linear probe (train).")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy not in ADAPTABLE_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {list(ADAPTABLE_STRATEGIES)}")
        return strategy

    @field_validator("methods")
    @classmethod
    def _once(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("methods are listed more than once")
        return methods


class EvaluateParams(_Section):
    bootstrap_samples: int = Field(ge=100, description="Resamples for confidence intervals.")
    confidence: float = Field(gt=0.5, lt=1, description="Confidence level of the intervals.")
    alpha: float = Field(gt=0, lt=0.5, description="Significance level of the paired test behind the verdict.")
    finding_flip_rate: float = Field(ge=0, le=1, description="Flip rate reported as a finding (Giskard's scan: 5%).")
    major_flip_rate: float = Field(ge=0, le=1, description="Flip rate reported as a major finding (Giskard: 10%).")
    tv_tolerance: float = Field(ge=0, le=1, description="Probability change that counts (CheckList's invariance tolerance).")
    max_probe_texts: int = Field(gt=0, description="Test texts per identity group swapped (only texts where the swap is within the model's window) and per perturbation (seeded samples).")
    examples: int = Field(ge=0, description="Texts shown per probe: those whose prediction moved most.")
    identity_terms: str = Field(min_length=1,
                                description="axis,group,term CSV of identity terms swapped by counterfactual probes.")
    template_probes: str | None = Field(description="text,template,<axis>... CSV scored by every candidate; null skips.")
    probe_C: Literal["auto"] | PositiveFloat = Field(description=(
        "Inverse L2 strength of the frozen-backbone probe: a number, or auto: chosen on validation over "
        "train.probe.C_grid by the linear_probe strategy's rule (so the two are the same model)."))
    probe_scratch: bool = Field(description=(
        "Run the bias and robustness probes on the scratch baseline too (it is always scored on test "
        "and validation for the verdict)."))

    @field_validator("major_flip_rate")
    @classmethod
    def _major_above_finding(cls, major: float, info) -> float:
        finding = info.data.get("finding_flip_rate")
        if finding is not None and major < finding:
            raise ValueError(f"must be at least finding_flip_rate ({finding})")
        return major


class GateParams(_Section):
    required_verdict: Literal["positive", "no_gain", "any"] = Field(
        description="Weakest transfer verdict accepted: positive, no_gain (not worse), or any.")
    min_margin: float = Field(description="Lowest accuracy margin over the best baseline, in points.")
    min_accuracy: float = Field(ge=0, le=1, description="Lowest test accuracy to register.")
    min_macro_f1: float = Field(ge=0, le=1, description="Lowest test macro-F1 to register.")
    max_group_gap: float = Field(ge=0, le=1, description="Largest accuracy or macro-F1 gap between groups.")
    max_counterfactual_flip_rate: float = Field(ge=0, le=1,
                                                description="Largest flip rate of any identity axis.")
    max_robustness_flip_rate: float = Field(ge=0, le=1, description="Largest flip rate of any perturbation.")
    required_adaptation_verdict: Literal["positive", "no_gain", "any"] = Field(
        description="Weakest verdict each adaptation method (adapt.methods) must reach against not adapting.")


class PromotionParams(_Section):
    min_gain: float = Field(ge=0, le=1, description=(
        "The new version becomes `champion` only if its test accuracy exceeds the champion's by more "
        "than this (both predicted in the same run, on the same test split)."))
    verdicts: list[Literal["positive", "no_gain", "negative"]] = Field(description=(
        "Transfer verdicts (reports/transfer.json) a version may have to become champion."))


class RegisterParams(_Section):
    model_name: str = Field(min_length=1, description="Registered model name.")
    experiment: str = Field(min_length=1, description="MLflow experiment of pipeline runs.")
    alias: str = Field(min_length=1, description="Alias set on every version that passes the gate.")
    promotion: PromotionParams = Field(description="When a new version becomes `champion`.")


class CurveParams(_Section):
    enabled: bool = Field(description="Run the data-efficiency curve (reports/curve.json); off: the stage writes a stub.")
    sizes: list[int] = Field(min_length=1, description=(
        "Training labels per class at each curve point (nested subsets); the whole train split is always added."))
    seeds: int = Field(ge=1, le=50, description="Subsets drawn (seeds) at each size below `seeds_below`.")
    seeds_below: int = Field(ge=1, description="Sizes at or above this draw one subset (seed) only.")
    finetune_sizes: list[int] = Field(description=(
        "Sizes (from `sizes`) at which `partial` is fine-tuned too (one seed each; each costs a training run)."))
    target_share: float = Field(gt=0, le=1, description=(
        "Target accuracy as a share of the best full-data accuracy; the curve reports the labels needed for it."))

    @field_validator("sizes")
    @classmethod
    def _sizes_increase(cls, sizes: list[int]) -> list[int]:
        if any(s < 1 for s in sizes) or sorted(set(sizes)) != sizes:
            raise ValueError("must be positive and strictly increasing")
        return sizes

    @field_validator("finetune_sizes")
    @classmethod
    def _finetune_within_sizes(cls, finetune: list[int], info) -> list[int]:
        sizes = info.data.get("sizes") or []
        stray = [s for s in finetune if s not in sizes]
        if stray:
            raise ValueError(f"{stray} are not in curve.sizes {sizes}")
        return finetune


class DomainParams(_Section):
    target: str | None = Field(description=(
        "The value of data.domain_column that is the target domain (the rest is the source); null: the domain stage is off."))
    max_rows: int = Field(ge=4, description="Train rows embedded per domain (a balanced, seeded sample).")
    permutations: int = Field(ge=19, description="Label permutations of the MMD test.")


# `register` (the stage's section) shadows ABCMeta.register on the class, not on instances.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    seed: int = Field(ge=0, description="Seeds splitting, head init, shuffling and dropout.")
    data: DataParams = Field(description="The data set: source, columns, validation, split sizes (prepare).")
    model: ModelParams = Field(description="The pretrained backbone (fetch) and its tokenization.")
    features: FeatureParams = Field(description="Frozen-backbone embeddings and transferability (features).")
    train: TrainParams = Field(description="Transfer strategies and baselines (train).")
    adapt: AdaptParams = Field(description="Domain adaptation on unlabelled target text (adapt, train).")
    evaluate: EvaluateParams = Field(description="Intervals, verdict, bias and robustness probes (evaluate).")
    gate: GateParams = Field(description="Thresholds a model must meet to be registered.")
    register: RegisterParams = Field(description="The MLflow experiment, model name, aliases (register).")
    curve: CurveParams = Field(description="The data-efficiency curve: accuracy vs labels per class (curve).")
    domain: DomainParams = Field(description="The gap between a source and a target domain (domain).")

    @field_validator("data")
    @classmethod
    def _columns_differ(cls, data: DataParams) -> DataParams:
        named = [data.text_column, data.label_column, data.id_column, *data.group_columns]
        named += [c for c in (data.split_column, data.domain_column) if c]
        repeated = sorted({c for c in named if named.count(c) > 1})
        if repeated:
            raise ValueError(f"a column may play one role only; {repeated} named more than once")
        return data

    @model_validator(mode="after")
    def _adaptation_has_what_it_needs(self) -> Params:
        methods, problems = self.adapt.methods, []
        if methods and self.data.unlabelled_source is None:
            problems.append(f"adapt.methods {methods} need unlabelled text: set data.unlabelled_source")
        if "mlm" in methods and self.adapt.strategy not in self.train.strategies:
            problems.append(f"adapt.strategy {self.adapt.strategy!r} must be in train.strategies "
                            "(trained from the pretrained backbone, it is the reference of the mlm verdict)")
        if "self_training" in methods and "linear_probe" not in self.train.strategies:
            problems.append("adapt.methods self_training adapts the linear probe: add linear_probe to train.strategies")
        if self.gate.required_adaptation_verdict != "any" and not methods:
            problems.append(f"gate.required_adaptation_verdict={self.gate.required_adaptation_verdict!r} "
                            "needs adapt.methods (nothing is adapted)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} is given twice (first on line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; DVC's YAML parser refuses the file. Refuse it here,
    with the line, before any stage runs."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise _DuplicateKey(key, line, first_lines[key])
                first_lines[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                break
        return super().construct_mapping(node, deep=deep)


def load(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`."""
    if not path.exists():
        raise GraftError(f"{path}: parameters file not found (run graft from the repository root)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as err:
        raise GraftError(f"{path}: {err}; DVC refuses duplicate keys") from None
    except yaml.YAMLError as err:
        raise GraftError(f"{path}: not valid YAML: {err}") from None
    return validate(_exponents_as_numbers(raw), str(path))


def _exponents_as_numbers(value: Any) -> Any:
    """YAML 1.1 reads `3e-5` (no dot) as a string; DVC's YAML 1.2 and users mean the number."""
    if isinstance(value, dict):
        return {k: _exponents_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exponents_as_numbers(v) for v in value]
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
        return float(value)
    return value


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
    validate(_exponents_as_numbers(yaml.safe_load(buffer.getvalue())), f"{path} with overrides {overrides}")
    if not dry_run:
        atomic_write_text(path, buffer.getvalue())
    return applied
