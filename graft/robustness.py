"""Robustness: how often a candidate's prediction flips under small, meaning-preserving edits of
test texts (character typos, casing, punctuation, whitespace). Seeded, so two runs perturb the
same texts the same way; every perturbed text goes through the candidate in one call."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from graft.bias import Predictor, severity, total_variation

_WORD = re.compile(r"[A-Za-z]{4,}")
_PUNCT = re.compile(r"[.,;:!?'\"-]")


def typo(text: str, rng: np.random.Generator) -> str:
    """Swap two adjacent inner letters in up to two words of four or more letters."""
    words = list(_WORD.finditer(text))
    if not words:
        return text
    chars = list(text)
    for k in rng.choice(len(words), size=min(2, len(words)), replace=False):
        m = words[int(k)]
        i = int(rng.integers(m.start() + 1, m.end() - 2))
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def casing(text: str, rng: np.random.Generator) -> str:
    """All lower case, all upper case, or title case (chosen by the seed)."""
    return (str.lower, str.upper, str.title)[int(rng.integers(0, 3))](text)


def punctuation(text: str, rng: np.random.Generator) -> str:
    """Drop the punctuation, or add a trailing exclamation mark where there is none."""
    stripped = _PUNCT.sub("", text)
    return stripped if stripped != text and rng.random() < 0.5 else text.rstrip(".") + "!"


def whitespace(text: str, rng: np.random.Generator) -> str:
    """Double some spaces and pad both ends."""
    parts = text.split(" ")
    return "  " + "".join(p + ("  " if rng.random() < 0.3 else " ") for p in parts).rstrip() + " \n"


PERTURBATIONS: dict[str, Callable[[str, np.random.Generator], str]] = {
    "typo": typo, "casing": casing, "punctuation": punctuation, "whitespace": whitespace,
}


def perturb(texts: Sequence[str], *, seed: int, max_texts: int) -> tuple[np.ndarray, dict[str, list[str]]]:
    """A seeded sample of at most `max_texts` rows, and each perturbation of each sampled text."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(texts))
    if len(rows) > max_texts:
        rows = np.sort(rng.choice(rows, size=max_texts, replace=False))
    return rows, {name: [fn(texts[i], rng) for i in rows] for name, fn in PERTURBATIONS.items()}


def robustness_probe(predict: Predictor, texts: Sequence[str], rows: np.ndarray, perturbed: dict[str, list[str]], *,
                     original_proba: np.ndarray, finding: float, major: float, classes: Sequence[str],
                     examples: int = 3) -> dict:
    """Flip rate and mean total-variation change per perturbation, with the texts that moved most."""
    names = list(perturbed)
    proba_all = predict([t for name in names for t in perturbed[name]])
    before = original_proba[rows]
    out, start = {}, 0
    for name in names:
        after = proba_all[start : start + len(rows)]
        start += len(rows)
        tv = total_variation(before, after)
        flips = before.argmax(1) != after.argmax(1)
        rate = float(flips.mean()) if len(rows) else None
        order = np.argsort(-(tv + flips))[:examples]
        out[name] = {"n": int(len(rows)), "flip_rate": rate, "mean_tv": float(tv.mean()) if len(rows) else None,
                     "severity": severity(rate, finding, major),
                     "examples": [{"text": texts[rows[k]], "perturbed": perturbed[name][k],
                                   "before": classes[before[k].argmax()], "after": classes[after[k].argmax()],
                                   "tv": float(tv[k])} for k in order if tv[k] > 0]}
    rates = [p["flip_rate"] for p in out.values() if p["flip_rate"] is not None]
    return {"perturbations": out, "max_flip_rate": max(rates) if rates else None}
