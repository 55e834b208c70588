"""Bias measures: group metrics (fairlearn's MetricFrame), counterfactual identity-term swaps,
template probes, and how often identity terms co-occur with each label in the training data.

Every measure takes candidates as `texts -> class probabilities` callables, so the frozen
backbone's linear probe, the fine-tuned model and the baselines (and a planted model in a test)
are measured the same way. Each callable is called once per measure with every probe text, so
transformer candidates batch the whole probe set through one length-sorted inference loop.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate, selection_rate
from sklearn.metrics import accuracy_score, f1_score

from graft.errors import GraftError
from graft.stats import bootstrap_scores, interval

Predictor = Callable[[Sequence[str]], np.ndarray]
PROBES_DIR = Path(__file__).parent / "probes"
IDENTITY_TERMS = PROBES_DIR / "identity_terms.csv"
SENTIMENT_TEMPLATES = PROBES_DIR / "sentiment_templates.csv"
# Gaps this small are float32 rounding of equal probabilities, not a direction to report.
NO_GAP = 1e-6


def severity(flip_rate: float | None, finding: float, major: float) -> str:
    """Giskard-style level of a flip rate: `major`, `finding`, or `ok`."""
    if flip_rate is None:
        return "n/a"
    return "major" if flip_rate >= major else "finding" if flip_rate >= finding else "ok"


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between rows of two probability matrices (0 = same, 1 = disjoint)."""
    return 0.5 * np.abs(p - q).sum(1)


# ---------------------------------------------------------------- identity terms and swaps


@dataclass(frozen=True)
class IdentityAxis:
    """One axis (e.g. gender): groups, each an ordered list of terms; term i of one group swaps
    with term i (modulo length) of another, so paired lists (he/she, his/her) stay paired."""

    name: str
    groups: dict[str, list[str]]

    def swap_map(self, source: str, target: str) -> dict[str, str]:
        src, dst = self.groups[source], self.groups[target]
        out: dict[str, str] = {}
        for i, term in enumerate(src):
            out.setdefault(term.lower(), dst[i % len(dst)])  # the first pairing of an ambiguous term wins
        return out


def load_identity_terms(path: Path = IDENTITY_TERMS) -> list[IdentityAxis]:
    """Read an `axis,group,term` CSV into axes; a malformed row is a one-line error naming it."""
    axes: dict[str, dict[str, list[str]]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"axis", "group", "term"} - set(reader.fieldnames or [])
        if missing:
            raise GraftError(f"{path}: missing column(s) {sorted(missing)}; expected axis,group,term")
        for line, row in enumerate(reader, start=2):
            if not all((row.get(k) or "").strip() for k in ("axis", "group", "term")):
                raise GraftError(f"{path}: row {line}: axis, group and term must all be non-empty")
            axes.setdefault(row["axis"].strip(), {}).setdefault(row["group"].strip(), []).append(row["term"].strip())
    for axis, groups in axes.items():
        if len(groups) < 2:
            raise GraftError(f"{path}: axis {axis!r} has one group; a swap needs at least two")
    return [IdentityAxis(name, groups) for name, groups in axes.items()]


def _pattern(terms: Sequence[str]) -> re.Pattern:
    words = sorted({t.lower() for t in terms}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if template.islower() else word


def swap_terms(text: str, mapping: Mapping[str, str], pattern: re.Pattern | None = None) -> str:
    """Replace every whole-word occurrence of a mapped term, keeping the original's casing."""
    pattern = pattern or _pattern(list(mapping))
    return pattern.sub(lambda m: _match_case(m.group(0), mapping[m.group(0).lower()]), text)


def counterfactual_pairs(texts: Sequence[str], axes: Sequence[IdentityAxis], *, max_texts: int, seed: int,
                         visible: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None) -> list[dict]:
    """The swap directions of every axis with the test texts they apply to and the swapped texts.

    For each source group: the test texts that mention it, kept only where the swap changes what
    the model sees when `visible(originals, swapped)` is given (a term past the truncation point
    cannot flip a prediction, and counting it would dilute the flip rate), then a seeded sample of
    at most `max_texts`. On a two-group axis every sampled text is swapped to the other group; on
    a wider axis (religion, nationality) each sampled text is swapped to one other group, the
    groups taken in turn over a seeded shuffle, so every direction is measured and the evidence
    stays one swap per source text."""
    rng = np.random.default_rng(seed)
    directions = []
    for axis in axes:
        for source in axis.groups:
            pattern = _pattern(axis.groups[source])
            targets = [g for g in axis.groups if g != source]
            rows = np.array([i for i, t in enumerate(texts) if pattern.search(t)], dtype=int)
            if visible is not None and len(rows):
                first = axis.swap_map(source, targets[0])
                rows = rows[np.asarray(visible([texts[i] for i in rows],
                                               [swap_terms(texts[i], first, pattern) for i in rows]), dtype=bool)]
            if len(rows) > max_texts:
                rows = np.sort(rng.choice(rows, size=max_texts, replace=False))
            assigned = {t: rows for t in targets} if len(targets) == 1 else {
                t: np.sort(part) for t, part in zip(targets, _deal(rng.permutation(rows), len(targets)), strict=True)}
            for target in targets:
                mapping = axis.swap_map(source, target)
                chosen = assigned[target]
                swapped = [swap_terms(texts[i], mapping, pattern) for i in chosen]
                directions.append({"axis": axis.name, "source": source, "target": target, "rows": chosen,
                                   "swapped": swapped})
    return directions


def _deal(rows: np.ndarray, hands: int) -> list[np.ndarray]:
    """Rows dealt to `hands` directions in turn (sizes differ by at most one)."""
    return [rows[k::hands] for k in range(hands)]


def counterfactual_probe(predict: Predictor, texts: Sequence[str], directions: Sequence[dict], *,
                         tolerance: float, finding: float, major: float, examples: int = 3,
                         original_proba: np.ndarray | None = None, classes: Sequence[str] | None = None) -> dict:
    """Flip rate and mean total-variation change of one candidate per axis and per swap direction,
    with the texts whose prediction moved most. Each direction also carries the signed mean change
    of every class's probability (`mean_shift`, swapped minus original) and the class that moved
    most (`largest_shift`): a positive change means the model gives the swapped-in group more of
    that class. All swapped texts go through `predict` at once."""
    base = original_proba if original_proba is not None else predict(list(texts))
    swapped_all = [t for d in directions for t in d["swapped"]]
    proba_all = predict(swapped_all) if swapped_all else np.zeros((0, base.shape[1]))
    label = (lambda k: classes[k]) if classes else (lambda k: int(k))
    per_direction, per_axis, start = [], {}, 0
    for d in directions:
        n = len(d["rows"])
        before, after = base[d["rows"]], proba_all[start : start + n]
        start += n
        tv = total_variation(before, after)
        flips = before.argmax(1) != after.argmax(1)
        order = np.argsort(-(tv + flips))[:examples]
        shift = (after - before).mean(0) if n else np.zeros(base.shape[1])
        moved = int(np.abs(shift).argmax())
        entry = {
            "axis": d["axis"], "direction": f"{d['source']}->{d['target']}", "n": n,
            "flip_rate": float(flips.mean()) if n else None,
            "mean_tv": float(tv.mean()) if n else None,
            "share_tv_above_tolerance": float((tv > tolerance).mean()) if n else None,
            # signed: what the swap does to each class's probability, so the direction survives
            "mean_shift": {label(k): float(v) for k, v in enumerate(shift)},
            "largest_shift": {"class": label(moved), "change": float(shift[moved])} if n else None,
            "examples": [{"text": texts[d["rows"][k]], "swapped": d["swapped"][k],
                          "before": label(before[k].argmax()), "after": label(after[k].argmax()),
                          "tv": float(tv[k])} for k in order if tv[k] > 0],
        }
        per_direction.append(entry)
        acc = per_axis.setdefault(d["axis"], {"flips": [], "tv": []})
        acc["flips"].append(flips)
        acc["tv"].append(tv)
    axes = {}
    for name, acc in per_axis.items():
        flips, tv = np.concatenate(acc["flips"]), np.concatenate(acc["tv"])
        rate = float(flips.mean()) if len(flips) else None
        axes[name] = {"n": int(len(flips)), "flip_rate": rate, "mean_tv": float(tv.mean()) if len(tv) else None,
                      "share_tv_above_tolerance": float((tv > tolerance).mean()) if len(tv) else None,
                      "severity": severity(rate, finding, major)}
    rates = [a["flip_rate"] for a in axes.values() if a["flip_rate"] is not None]
    return {"axes": axes, "directions": per_direction, "max_flip_rate": max(rates) if rates else None}


# ---------------------------------------------------------------- co-occurrence in training data


def cooccurrence(texts: Sequence[str], labels: Sequence[str], axes: Sequence[IdentityAxis]) -> dict:
    """How many training texts mention each identity term, per label: the fine-tuning data's share
    of any bias. Terms never seen in training have zero weight in TF-IDF."""
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    out: dict = {}
    for axis in axes:
        out[axis.name] = {}
        for group, terms in axis.groups.items():
            pattern = _pattern(terms)
            mentions = np.array([bool(pattern.search(t)) for t in texts], dtype=bool)
            by_term = {}
            for term in sorted({t.lower() for t in terms}):
                hit = np.array([bool(_pattern([term]).search(t)) for t in texts], dtype=bool) if mentions.any() \
                    else np.zeros(len(texts), dtype=bool)
                if hit.any():
                    by_term[term] = {c: int((hit & (labels == c)).sum()) for c in classes}
            out[axis.name][group] = {
                "texts": int(mentions.sum()),
                "per_label": {c: int((mentions & (labels == c)).sum()) for c in classes},
                "terms": by_term,
                "absent_terms": sorted({t.lower() for t in terms} - set(by_term)),
            }
    return out


# ---------------------------------------------------------------- group metrics (fairlearn)


def group_metrics(y_true: np.ndarray, y_pred: np.ndarray, groups: pd.Series, classes: Sequence[str], *,
                  samples: int, confidence: float, seed: int) -> dict:
    """Per-group accuracy, macro-F1, selection rate per class (and FPR/FNR when binary) through
    fairlearn's MetricFrame, the largest gap per metric with its direction (`gap_direction`: the
    group with the lowest and the highest value), and bootstrap intervals of the accuracy and
    macro-F1 gaps (rows resampled within each group, so group sizes stay fixed)."""
    n_classes = len(classes)
    metrics: dict[str, Callable] = {
        "accuracy": accuracy_score,
        "macro_f1": lambda t, p: f1_score(t, p, average="macro", zero_division=0),
    }
    for k, name in enumerate(classes):
        metrics[f"selection_rate[{name}]"] = functools.partial(selection_rate, pos_label=k)
    if n_classes == 2:
        metrics["false_positive_rate"] = functools.partial(false_positive_rate, pos_label=1)
        metrics["false_negative_rate"] = functools.partial(false_negative_rate, pos_label=1)
    groups = pd.Series(groups).astype(str).reset_index(drop=True)
    frame = MetricFrame(metrics=metrics, y_true=np.asarray(y_true), y_pred=np.asarray(y_pred),
                        sensitive_features=groups)
    by_group = {str(g): {m: float(v) for m, v in row.items()} for g, row in frame.by_group.iterrows()}
    gaps = {m: float(v) for m, v in frame.difference(method="between_groups").items()}
    gap_direction = {m: _lower_higher({g: row[m] for g, row in by_group.items()}) for m in gaps}
    rng = np.random.default_rng(seed)
    boot: dict[str, list[np.ndarray]] = {"accuracy": [], "macro_f1": []}
    values = groups.to_numpy()
    for g in sorted(set(values)):
        rows = np.flatnonzero(values == g)
        idx = rows[rng.integers(0, len(rows), size=(samples, len(rows)))]
        scores = bootstrap_scores(np.asarray(y_true), np.asarray(y_pred), idx, n_classes)
        for m in boot:
            boot[m].append(scores[m])
    gap_ci = {m: interval(np.ptp(np.stack(v), axis=0), confidence) for m, v in boot.items()}
    return {"groups": by_group, "sizes": {str(g): int(n) for g, n in groups.value_counts().items()},
            "gaps": gaps, "gap_direction": gap_direction, "gap_ci": gap_ci}


def _lower_higher(values: Mapping[str, float]) -> dict:
    """Which group scores lowest and which highest (both None when every group scores the same:
    a zero gap has no direction)."""
    finite = {g: v for g, v in values.items() if v == v}  # a metric undefined for a group is NaN
    if len(finite) < 2 or max(finite.values()) - min(finite.values()) <= NO_GAP:
        return {"lower": None, "higher": None}
    return {"lower": min(finite, key=finite.get), "higher": max(finite, key=finite.get)}


# ---------------------------------------------------------------- template probes


def load_template_probes(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """A probe CSV: columns `text`, `template`, and one column per identity axis (a row names its
    group on the axes it varies and leaves the others empty). Returns the frame and the axes."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as err:
        raise GraftError(f"{path}: cannot read template probes: {err}") from None
    missing = {"text", "template"} - set(frame.columns)
    if missing:
        raise GraftError(f"{path}: missing column(s) {sorted(missing)}; expected text, template and one column per axis")
    axes = [c for c in frame.columns if c not in ("text", "template")]
    if not axes:
        raise GraftError(f"{path}: no identity-axis column besides text and template")
    empty = frame.index[frame["text"].str.strip() == ""]
    if len(empty):
        raise GraftError(f"{path}: row {int(empty[0]) + 2}: empty text")
    return frame, axes


def template_probe(predict: Predictor, frame: pd.DataFrame, axes: Sequence[str], classes: Sequence[str], *,
                   samples: int, confidence: float, seed: int, proba: np.ndarray | None = None) -> dict:
    """Per-group mean predicted probability of each class on every axis, and the largest gap
    between groups per class with a bootstrap interval and its direction (`gap_direction`: the
    group given the lowest and the highest mean probability; `max_gap_direction` for the class
    with the widest gap).

    The template is the unit: a group's mean is the mean over templates of its rows' mean in
    that template, and the bootstrap resamples templates, so every resample compares the same
    sentences with only the identity term changed (resampling rows instead would mix a
    template's sentiment into the gap). Templates that lack a group on an axis are left out of
    that axis."""
    proba = proba if proba is not None else predict(frame["text"].tolist())
    out = {}
    for axis in axes:
        mask = frame[axis].to_numpy() != ""
        groups, templates = frame[axis].to_numpy()[mask], frame["template"].to_numpy()[mask]
        names = sorted(set(groups))
        if len(names) < 2:
            continue
        cells = pd.DataFrame(proba[mask]).groupby([templates, groups]).mean()
        full = [t for t in dict.fromkeys(templates) if all((t, g) in cells.index for g in names)]
        if not full:
            continue
        per_template = np.stack([[cells.loc[(t, g)].to_numpy() for g in names] for t in full])  # T x G x K
        means = per_template.mean(0)
        idx = np.random.default_rng(seed).integers(0, len(full), size=(samples, len(full)))
        boot_gaps = np.ptp(per_template[idx].mean(1), axis=1)  # samples x K
        gaps = np.ptp(means, axis=0)
        direction = {c: _lower_higher(dict(zip(names, means[:, k].tolist(), strict=True))) for k, c in enumerate(classes)}
        widest = classes[int(gaps.argmax())]
        out[axis] = {
            "n": int(mask.sum()),
            "templates": len(full),
            "mean_proba": {g: dict(zip(classes, m.tolist(), strict=True)) for g, m in zip(names, means, strict=True)},
            "gap": dict(zip(classes, gaps.tolist(), strict=True)),
            "gap_direction": direction,
            "gap_ci": {c: interval(boot_gaps[:, k], confidence) for k, c in enumerate(classes)},
            "max_gap": float(gaps.max()),
            "max_gap_direction": {"class": widest if direction[widest]["lower"] else None, **direction[widest]},
        }
    return out
