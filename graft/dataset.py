"""The labelled data set: validation that catches what silently ruins a fine-tune, a stratified
split keyed on content (not on row order), fingerprints, the data card, and version diffs.

Row numbers in messages count data rows from 1, in the order of the source (for a CSV, line =
row + 1 because of the header).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from graft.baselines import has_tfidf_words
from graft.errors import GraftError

SPLITS = ("train", "val", "test")
MISSING_GROUP = "(missing)"
_SHOWN_ROWS = 10


@dataclass
class Validated:
    """A clean frame (columns id, text, label, [split], groups..., [domain]) and what changed."""

    frame: pd.DataFrame
    dropped_duplicates: int = 0
    dropped_conflicts: int = 0
    conflicts: int = 0
    missing_groups: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rows(mask: pd.Series | np.ndarray, index: pd.Index) -> str:
    """`rows [3, 7]`, 1-based, at most ten shown."""
    rows = [int(i) + 1 for i in index[np.asarray(mask)]]
    shown = ", ".join(map(str, rows[:_SHOWN_ROWS]))
    more = f", … {len(rows) - _SHOWN_ROWS} more" if len(rows) > _SHOWN_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} [{shown}{more}]"


def content_id(text: str) -> str:
    """A row id made from the text itself, so ids do not depend on row position."""
    return "sha-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def validate_frame(
    frame: pd.DataFrame,
    *,
    source: str,
    text_column: str,
    label_column: str,
    id_column: str = "id",
    split_column: str | None = None,
    group_columns: Iterable[str] = (),
    domain_column: str | None = None,
    on_conflict: str = "error",
) -> Validated:
    """Check every rule, report every problem at once (one line per kind), return a clean frame."""
    group_columns = list(group_columns)
    wanted = [text_column, label_column, *group_columns]
    wanted += [c for c in (split_column, domain_column) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise GraftError(
            f"{source}: missing column(s) {missing}; found {list(frame.columns)} "
            "(set data.text_column / label_column / group_columns / split_column / domain_column in params.yaml)"
        )
    frame = frame.reset_index(drop=True)
    problems: list[str] = []
    texts = frame[text_column]
    not_text = texts.notna() & ~texts.map(lambda v: isinstance(v, str))
    if not_text.any():
        problems.append(f"{source}: column {text_column!r}: {int(not_text.sum())} value(s) are not text, {_rows(not_text, frame.index)}")
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    if empty.any():
        problems.append(
            f"{source}: column {text_column!r}: {int(empty.sum())} empty or whitespace-only text(s), {_rows(empty, frame.index)}"
        )
    # Texts with no word (emoji, punctuation only) are fine beside others; with nothing else the
    # TF-IDF baseline has no vocabulary and the comparison the verdict rests on cannot be made.
    usable = ~empty & ~not_text
    if usable.any() and not has_tfidf_words(texts[usable].tolist()).any():
        problems.append(
            f"{source}: column {text_column!r}: no text has a word the TF-IDF baseline can use (2+ letters or "
            f"digits; emoji and punctuation are not words), {_rows(usable, frame.index)}"
        )
    labels = frame[label_column]
    no_label = labels.isna() | labels.astype(str).str.strip().eq("")
    if no_label.any():
        problems.append(f"{source}: column {label_column!r}: {int(no_label.sum())} missing label(s), {_rows(no_label, frame.index)}")
    if split_column:
        bad_split = ~frame[split_column].isin(SPLITS)
        if bad_split.any():
            found = sorted({str(v) for v in frame.loc[bad_split, split_column]})[:5]
            problems.append(
                f"{source}: column {split_column!r}: {int(bad_split.sum())} value(s) not in {list(SPLITS)} "
                f"(found {found}), {_rows(bad_split, frame.index)}"
            )
    if problems:
        raise GraftError("\n".join(problems))

    out = pd.DataFrame({"text": texts.astype(str), "label": labels.astype(str).str.strip()})
    has_ids = id_column in frame.columns
    if has_ids:
        ids = frame[id_column]
        if ids.isna().any():
            problems.append(f"{source}: column {id_column!r}: {int(ids.isna().sum())} missing id(s), {_rows(ids.isna(), frame.index)}")
        out.insert(0, "id", ids.astype(str))
    else:
        out.insert(0, "id", out["text"].map(content_id))
    if split_column:
        out["split"] = frame[split_column].astype(str)
    result = Validated(out)
    for column in group_columns:
        values = frame[column]
        result.missing_groups[column] = int(values.isna().sum())
        out[column] = values.astype("string").fillna(MISSING_GROUP).astype(str)
    if domain_column:
        out["domain"] = frame[domain_column].astype("string").fillna(MISSING_GROUP).astype(str)

    # The same text under two labels: reported, and an error unless the user says to drop them.
    labels_per_text = out.groupby("text", sort=False)["label"].nunique()
    conflicting = out["text"].map(labels_per_text).gt(1)
    if conflicting.any():
        result.conflicts = int(out.loc[conflicting, "text"].nunique())
        if on_conflict != "drop":
            problems.append(
                f"{source}: column {label_column!r}: {result.conflicts} text(s) appear under two or more labels, "
                f"{_rows(conflicting, out.index)} (set data.on_conflict: drop to drop them)"
            )
    # Exact duplicate texts (same label): the first copy stays, the rest are dropped and counted.
    duplicate = out.duplicated(subset=["text", "label"], keep="first") & ~conflicting
    keep = ~duplicate & ~(conflicting if on_conflict == "drop" else False)
    if has_ids:
        clash = out["id"].where(keep).duplicated(keep=False) & keep
        if clash.any():
            problems.append(
                f"{source}: column {id_column!r}: {int(clash.sum())} row(s) share an id with a different text, "
                f"{_rows(clash, out.index)}; ids must be unique"
            )
    if problems:
        raise GraftError("\n".join(problems))
    result.dropped_duplicates = int(duplicate.sum())
    result.dropped_conflicts = int(conflicting.sum()) if on_conflict == "drop" else 0
    out = out[keep]
    if result.dropped_duplicates:
        result.notes.append(f"dropped {result.dropped_duplicates} exact duplicate text(s)")
    if result.dropped_conflicts:
        result.notes.append(f"dropped {result.dropped_conflicts} row(s) of {result.conflicts} text(s) with conflicting labels")
    result.frame = out.reset_index(drop=True)
    if result.frame["label"].nunique() < 2:
        raise GraftError(f"{source}: column {label_column!r} has {result.frame['label'].nunique()} class(es); at least 2 are needed")
    return result


def split_frame(
    frame: pd.DataFrame, *, train_size: int, val_size: int, test_size: int | None, seed: int, source: str
) -> dict[str, pd.DataFrame]:
    """Deterministic stratified train/val/test split of the rows in id order (ids come from the
    source or from the text, so row order does not matter), or the user's own `split` column."""
    if "split" in frame.columns:
        splits = {name: frame[frame["split"] == name].drop(columns="split") for name in SPLITS}
        empty = [name for name, part in splits.items() if part.empty]
        if empty:
            raise GraftError(f"{source}: the split column assigns no rows to {empty}")
        return {name: part.sort_values("id", kind="stable").reset_index(drop=True) for name, part in splits.items()}
    counts = frame["label"].value_counts().to_dict()
    classes = len(counts)
    too_small = {c: n for c, n in sorted(counts.items()) if n < 3}
    if too_small:
        raise GraftError(f"{source}: class(es) too small to reach train, val and test (rows per class: {too_small}); each needs at least 3")
    sizes = {"data.train_size": train_size, "data.val_size": val_size, "data.test_size": test_size}
    below = [f"{key}={value}" for key, value in sizes.items() if value is not None and value < classes]
    if below:
        raise GraftError(
            f"{source}: {', '.join(below)} is below the number of classes ({classes}); a stratified split needs one row per class"
        )
    wanted = train_size + val_size + (test_size if test_size is not None else classes)
    if wanted > len(frame):
        raise GraftError(
            f"{source}: {len(frame)} rows after validation, but data.train_size + data.val_size + "
            f"{'data.test_size' if test_size is not None else 'one test row per class'} ask for {wanted}"
        )
    # A stable order first, so the split depends on content (ids), not on the source's row order.
    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    train, rest = train_test_split(frame, train_size=train_size, stratify=frame["label"], random_state=seed)
    val, rest = train_test_split(rest, train_size=val_size, stratify=rest["label"], random_state=seed)
    if test_size is not None and test_size < len(rest):
        unused = len(rest) - test_size
        if unused >= classes:
            rest, _ = train_test_split(rest, train_size=test_size, stratify=rest["label"], random_state=seed)
        else:  # too few rows left over for a stratified split: one fewer row in each of the largest classes
            counts = rest["label"].value_counts()
            largest = sorted(counts.index, key=lambda c: (-counts[c], c))[:unused]
            rest = rest.drop(index=[rest.index[rest["label"] == c][-1] for c in largest])
    out = {name: part.sort_values("id", kind="stable").reset_index(drop=True)
           for name, part in (("train", train), ("val", val), ("test", rest))}
    assert_disjoint(out)
    return out


def assert_disjoint(splits: dict[str, pd.DataFrame]) -> None:
    """No text may reach two splits (that would leak test answers into training)."""
    seen: dict[str, str] = {}
    for name, part in splits.items():
        for text in part["text"]:
            if text in seen and seen[text] != name:
                raise AssertionError(f"a text reached both {seen[text]!r} and {name!r}: {text[:60]!r}")
            seen[text] = name


def fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the rows' ids, labels and texts in id order: the data set's content digest."""
    digest = hashlib.sha256()
    for row in frame.sort_values("id", kind="stable").itertuples(index=False):
        for value in (row.id, row.label, row.text):
            digest.update(value.encode("utf-8"))
            digest.update(b"\x00")
    return digest.hexdigest()


def diff_rows(old: pd.DataFrame, new: pd.DataFrame) -> dict:
    """Rows added, removed and relabelled between two `rows` indexes (columns id, label, split)."""
    old_labels = old.set_index("id")["label"]
    new_labels = new.set_index("id")["label"]
    common = old_labels.index.intersection(new_labels.index)
    relabelled = common[old_labels[common].to_numpy() != new_labels[common].to_numpy()]
    return {
        "added": int(len(new_labels.index.difference(old_labels.index))),
        "removed": int(len(old_labels.index.difference(new_labels.index))),
        "relabelled": int(len(relabelled)),
        "relabelled_ids": sorted(map(str, relabelled))[:20],
    }


def _normalised(text: str) -> str:
    return " ".join(str(text).split()).lower()


def clean_unlabelled(frame: pd.DataFrame, *, source: str, text_column: str, label_column: str,
                     splits: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    """Unlabelled texts for adaptation: the text column only (labels, if present, are ignored),
    empty texts and repeats dropped, and every text that is also in a labelled split dropped
    (compared case- and whitespace-insensitively): no val or test text may reach adaptation,
    and train texts are added by the methods themselves. Returns (id, text) rows and counts."""
    if text_column not in frame.columns:
        raise GraftError(f"{source}: missing column {text_column!r} (data.text_column) in the unlabelled source; "
                         f"found {list(frame.columns)}")
    texts = frame[text_column].reset_index(drop=True)
    not_text = texts.notna() & ~texts.map(lambda v: isinstance(v, str))
    if not_text.any():
        raise GraftError(f"{source}: column {text_column!r}: {int(not_text.sum())} value(s) are not text, "
                         f"{_rows(not_text, texts.index)}")
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    kept = texts[~empty].astype(str)
    keys = kept.map(_normalised)
    repeated = keys.duplicated()
    kept, keys = kept[~repeated], keys[~repeated]
    counts = {"rows_read": int(len(texts)), "dropped_empty": int(empty.sum()), "dropped_duplicates": int(repeated.sum()),
              "labels_ignored": label_column in frame.columns}
    for name in ("test", "val", "train"):
        labelled = set(splits[name]["text"].map(_normalised)) if name in splits else set()
        inside = keys.isin(labelled)
        counts[f"dropped_in_{name}"] = int(inside.sum())
        kept, keys = kept[~inside], keys[~inside]
    if kept.empty:
        raise GraftError(f"{source}: no unlabelled text left after dropping empty texts, repeats and texts of the "
                         f"labelled splits ({counts})")
    out = pd.DataFrame({"id": kept.map(content_id).to_numpy(), "text": kept.to_numpy()})
    counts["rows"] = int(len(out))
    return out, counts
