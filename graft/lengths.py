"""Sequence length from the data: the train split's token lengths, `model.max_length: auto`, and
the one place train and evaluate learn the length and truncation the features stage used.

The rule of `auto` (`choose_max_length`), on the train split's token lengths (untruncated,
special tokens included):

1. the smallest length that keeps `length_coverage` of train texts whole, rounded up to a
   multiple of 8;
2. capped by the backbone's positions (`max_position_embeddings`, and the tokenizer's
   `model_max_length` where it states one: RoBERTa has 514 positions for 512 tokens);
3. lowered by 8 at a time while the mean tokens per train text after truncation exceeds
   `length_budget` (the cost: batches are grouped by length and padded per batch, so compute per
   epoch grows at least linearly with that mean; attention adds a quadratic part on top);
4. never below 8.

The features stage resolves it (it has the tokenizer and the train split), embeds with it, and
writes the result into its own output (`data/features/recipe.json`): train and evaluate read it
through `resolved_tokenization`, so all three, and the served model, see the same tokens. The
distribution, the choice and its cost go to `reports/sequence_length.json` and a histogram.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graft.errors import GraftError
from graft.files import read_json

AUTO = "auto"
STEP = 8
MIN_LENGTH = 8
# the length graft used before `auto`, and the default: costs are stated relative to it
REFERENCE_LENGTH = 128
# a tokenizer without a stated limit reports a huge sentinel (int(1e30)) as model_max_length
_UNSTATED = 1_000_000
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


def token_lengths(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Tokens per text, untruncated, with the special tokens the model sees."""
    if not len(texts):
        return np.zeros(0, dtype=np.int64)
    # verbose=False: texts longer than the model's positions are what is being measured
    ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def position_cap(max_position_embeddings: int, tokenizer_max_length: int | None) -> int:
    """The longest sequence the backbone takes: its positions, and the tokenizer's limit where it
    states one (RoBERTa: 514 positions, 512 tokens)."""
    cap = int(max_position_embeddings)
    if tokenizer_max_length is not None and 0 < tokenizer_max_length < _UNSTATED:
        cap = min(cap, int(tokenizer_max_length))
    return cap


def backbone_cap(config, tokenizer) -> int:
    """`position_cap` of a loaded backbone config and tokenizer."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 1:
        positions = _UNSTATED
    return position_cap(positions, getattr(tokenizer, "model_max_length", None))


def mean_tokens(lengths: np.ndarray, max_length: int) -> float:
    """Mean tokens per text after truncation at `max_length` (what an epoch's compute follows)."""
    return float(np.minimum(lengths, max_length).mean())


def _quantile(lengths: np.ndarray, q: float) -> int:
    # inverted_cdf: the smallest observed length with at least q of the texts at or below it
    return int(np.quantile(lengths, q, method="inverted_cdf"))


def _histogram(lengths: np.ndarray) -> dict:
    top = int(lengths.max())
    width = max(STEP, -(-top // 40 // STEP) * STEP)  # about 40 bars, each a multiple of 8 wide
    edges = np.arange(0, top + width + 1, width)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def length_facts(lengths: np.ndarray, max_length: int) -> dict:
    """What truncating these lengths at `max_length` keeps and costs, beside the reference 128."""
    lengths = np.asarray(lengths)
    at, ref = mean_tokens(lengths, max_length), mean_tokens(lengths, REFERENCE_LENGTH)
    return {
        "texts": int(lengths.size),
        "quantiles": {f"p{round(q * 100)}": _quantile(lengths, q) for q in QUANTILES} | {"max": int(lengths.max())},
        "mean_tokens_untruncated": round(float(lengths.mean()), 2),
        "max_length": int(max_length),
        "truncated_share": round(float((lengths > max_length).mean()), 4),
        "mean_tokens": round(at, 2),
        "reference": {"max_length": REFERENCE_LENGTH, "truncated_share": round(float((lengths > REFERENCE_LENGTH).mean()), 4),
                      "mean_tokens": round(ref, 2)},
        # mean tokens per text after truncation, relative to max_length 128
        "relative_cost": round(at / ref, 3),
        "histogram": _histogram(lengths),
    }


def choose_max_length(lengths: Sequence[int] | np.ndarray, *, coverage: float, budget: int,
                      cap: int) -> tuple[int, dict]:
    """`max_length: auto` from train token lengths: the smallest multiple of 8 that keeps
    `coverage` of the texts whole, no more than `cap` (the backbone's positions), lowered by 8
    while the mean tokens per text after truncation exceeds `budget`, never below 8.

    Returns the length and its facts (`length_facts` plus the rule's steps and which one decided)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise GraftError("max_length auto: no train texts to measure")
    if not 0 < coverage <= 1:
        raise GraftError(f"max_length auto: coverage {coverage} is not in (0, 1]")
    if cap < MIN_LENGTH:
        raise GraftError(f"max_length auto: the backbone takes {cap} tokens, fewer than the minimum {MIN_LENGTH}")
    covering = _quantile(lengths, coverage)
    rounded = -(-covering // STEP) * STEP
    choice, decided_by = (rounded, "coverage") if rounded >= MIN_LENGTH else (MIN_LENGTH, "minimum")
    if choice > cap:
        choice, decided_by = cap, "cap"
    while choice > MIN_LENGTH and mean_tokens(lengths, choice) > budget:
        choice, decided_by = max(MIN_LENGTH, (choice - 1) // STEP * STEP), "budget"
    rule = {"coverage": coverage, "budget_mean_tokens": budget, "cap": int(cap), "covering_length": covering,
            "decided_by": decided_by}
    return int(choice), {**length_facts(lengths, choice), "rule": rule}


def resolve_max_length(max_length: int | str, lengths: np.ndarray, *, coverage: float, budget: int,
                       cap: int) -> tuple[int, dict]:
    """`model.max_length` as a number of tokens: `auto` chosen by `choose_max_length`, a number
    checked against the backbone's cap. Facts: the distribution at the length used, and what
    `auto` picks (so a fixed length's report says what the data would choose)."""
    auto, auto_facts = choose_max_length(lengths, coverage=coverage, budget=budget, cap=cap)
    suggestion = {"max_length": auto, "relative_cost": auto_facts["relative_cost"],
                  "truncated_share": auto_facts["truncated_share"], **auto_facts["rule"]}
    if max_length == AUTO:
        return auto, {**auto_facts, "requested": AUTO, "auto": suggestion}
    if int(max_length) > cap:
        raise GraftError(f"model.max_length: {max_length} tokens, but the backbone takes at most {cap} "
                         f"(max_position_embeddings / the tokenizer's model_max_length); use {cap} or auto")
    return int(max_length), {**length_facts(lengths, int(max_length)), "requested": int(max_length), "auto": suggestion}


@dataclass(frozen=True)
class Tokenization:
    """What every stage and the served model cut texts to (the resolved length and the
    truncation), and the precision the scoring forward passes run in (graft.precision)."""

    max_length: int
    truncation: str
    inference: str = "fp32"


def for_backbone(model_params, tokenizer, encoder_config, train_texts: Sequence[str]) -> tuple[Tokenization, dict]:
    """The length and truncation one backbone cuts texts to (`auto` resolved on the train texts
    with its own tokenizer and positions), and the facts: what features writes for THE backbone
    and select uses to score each candidate at the length it would get."""
    lengths = token_lengths(tokenizer, train_texts)
    max_length, facts = resolve_max_length(model_params.max_length, lengths, coverage=model_params.length_coverage,
                                           budget=model_params.length_budget,
                                           cap=backbone_cap(encoder_config, tokenizer))
    return (Tokenization(max_length=max_length, truncation=model_params.truncation),
            {**facts, "truncation": model_params.truncation})


def recipe(tokenization: Tokenization, *, requested: int | str, inference_requested: str = "fp32") -> dict:
    """The features stage's record of how it tokenized and which inference mode it embedded in
    (no run facts: the timings behind an `auto` mode are in reports/inference.json)."""
    return {"max_length": tokenization.max_length, "truncation": tokenization.truncation, "requested": requested,
            "inference": tokenization.inference, "inference_requested": inference_requested}


def resolved_tokenization(params, layout) -> Tokenization:
    """The length and truncation the features stage embedded with (its recipe in `layout`),
    checked against params: what train, evaluate and the serving description use instead of
    `model.max_length`."""
    path = Path(layout.recipe)
    if not path.is_file():
        raise GraftError(f"{path}: missing: the features stage writes the resolved max_length there; "
                         "run the 'features' stage first (graft stage features)")
    try:
        found = read_json(path)
        length, truncation, requested = int(found["max_length"]), str(found["truncation"]), found["requested"]
    except (KeyError, TypeError, ValueError) as err:
        raise GraftError(f"{path}: not a features recipe ({err}); run the 'features' stage again") from None
    model = params.model
    if requested != model.max_length or truncation != model.truncation:
        raise GraftError(f"{path}: features ran with max_length {requested!r}, truncation {truncation!r}, but params "
                         f"say {model.max_length!r}, {model.truncation!r}; run the 'features' stage again")
    from graft.precision import MODES

    # recipes written before model.inference existed embedded in fp32
    mode, mode_requested = found.get("inference", "fp32"), found.get("inference_requested", "fp32")
    if mode not in MODES:
        raise GraftError(f"{path}: inference {mode!r} is not one of {', '.join(MODES)}; run the 'features' stage again")
    if mode_requested != model.inference:
        raise GraftError(f"{path}: features ran with model.inference {mode_requested!r}, but params say "
                         f"{model.inference!r}; run the 'features' stage again")
    return Tokenization(max_length=length, truncation=truncation, inference=mode)



def summary_line(facts: Mapping) -> str:
    """One sentence: the length used, what it truncates and costs, and what auto would pick."""
    q = facts["quantiles"]
    line = (f"max_length {facts['max_length']} ({'auto' if facts.get('requested') == AUTO else 'fixed'}): "
            f"{facts['truncated_share']:.1%} of {facts['texts']} train texts truncated (at 128: "
            f"{facts['reference']['truncated_share']:.1%}); {facts['mean_tokens']:.0f} tokens per text, "
            f"{facts['relative_cost']:.2f}x the cost of 128; token lengths median {q['p50']}, 90% {q['p90']}, "
            f"max {q['max']}")
    auto = facts.get("auto") or {}
    if facts.get("requested") == AUTO:
        line += f"; decided by {auto.get('decided_by')}"
    elif auto:
        line += f"; auto would pick {auto['max_length']} ({auto['relative_cost']:.2f}x, by {auto['decided_by']})"
    return line


def token_lengths_png(facts: Mapping) -> bytes:
    """Histogram of train token lengths with the length used (and auto's pick, and 128) marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = facts["histogram"]["edges"], facts["histogram"]["counts"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#9ab", edgecolor="white")
    ax.axvline(facts["max_length"], color="#a00", label=f"max_length {facts['max_length']} "
               f"({facts['truncated_share']:.0%} truncated, {facts['relative_cost']:.2f}x cost of 128)")
    auto = (facts.get("auto") or {}).get("max_length")
    if auto is not None and auto != facts["max_length"]:
        ax.axvline(auto, color="#060", linestyle="--", label=f"auto would pick {auto}")
    if facts["max_length"] != REFERENCE_LENGTH:
        ax.axvline(REFERENCE_LENGTH, color="#555", linestyle=":", label=f"{REFERENCE_LENGTH} (reference)")
    ax.set_xlabel("tokens per train text (untruncated, special tokens included)")
    ax.set_ylabel("texts")
    ax.set_title("Token lengths of the train split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
