"""prepare: read the source, validate it, split it (stratified, seeded), write parquet + a data card."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, write_json
from graft.sources import read_table

OUT_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")


def validate_frame(frame: pd.DataFrame, *, text_column: str, label_column: str, source: str) -> pd.DataFrame:
    """Check columns, texts and labels; return a frame with `text` and `label` (str) columns."""
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise GraftError(
            f"{source}: missing column(s) {missing}; found {list(frame.columns)} "
            "(set data.text_column / data.label_column in params.yaml)"
        )
    frame = frame.reset_index(drop=True)
    texts = frame[text_column]
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    if empty.any():
        rows = [int(i) for i in frame.index[empty][:10]]
        raise GraftError(f"{source}: {int(empty.sum())} empty text(s) in column {text_column!r}, rows {rows}")
    labels = frame[label_column]
    if labels.isna().any():
        rows = [int(i) for i in frame.index[labels.isna()][:10]]
        raise GraftError(f"{source}: {int(labels.isna().sum())} missing label(s) in column {label_column!r}, rows {rows}")
    out = frame.rename(columns={text_column: "text", label_column: "label"})
    out["text"] = out["text"].astype(str)
    out["label"] = out["label"].astype(str)
    if out["label"].nunique() < 2:
        raise GraftError(f"{source}: column {label_column!r} has {out['label'].nunique()} class(es); at least 2 are needed")
    if "id" not in out.columns:
        out.insert(0, "id", [f"row-{i}" for i in range(len(out))])
    out["id"] = out["id"].astype(str)
    return out


def split_frame(
    frame: pd.DataFrame, *, train_size: int, val_size: int, test_size: int | None, seed: int, source: str
) -> dict[str, pd.DataFrame]:
    """Deterministic stratified train/val/test split; every class must reach every split."""
    counts = frame["label"].value_counts()
    too_small = sorted(counts[counts < 3].index)
    if too_small:
        raise GraftError(f"{source}: class(es) {too_small} have fewer than 3 rows; each split needs one")
    wanted = train_size + val_size + (test_size or counts.size)
    if wanted > len(frame):
        raise GraftError(
            f"{source}: {len(frame)} rows, but data.train_size + val_size + test_size ask for {wanted}"
        )
    # A stable order first, so the split depends on content, not on file-system listing order.
    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    train, rest = train_test_split(frame, train_size=train_size, stratify=frame["label"], random_state=seed)
    val, rest = train_test_split(rest, train_size=val_size, stratify=rest["label"], random_state=seed)
    if test_size is not None and test_size < len(rest):
        rest, _ = train_test_split(rest, train_size=test_size, stratify=rest["label"], random_state=seed)
    return {"train": train, "val": val, "test": rest}


def fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the rows' ids, labels and texts in id order: the data set's content digest."""
    digest = hashlib.sha256()
    for row in frame.sort_values("id", kind="stable").itertuples(index=False):
        for value in (row.id, row.label, row.text):
            digest.update(value.encode("utf-8"))
            digest.update(b"\x00")
    return digest.hexdigest()


def datacard(splits: dict[str, pd.DataFrame], classes: list[str], source: str) -> dict:
    card: dict = {"source": source, "classes": classes, "splits": {}}
    for name, frame in splits.items():
        chars = frame["text"].str.len()
        words = frame["text"].str.split().str.len()
        card["splits"][name] = {
            "rows": len(frame),
            "per_class": {c: int((frame["label"] == c).sum()) for c in classes},
            "text_chars": {"min": int(chars.min()), "median": float(chars.median()), "max": int(chars.max())},
            "text_words": {"min": int(words.min()), "median": float(words.median()), "max": int(words.max())},
            "fingerprint": fingerprint(frame),
        }
    card["fingerprint"] = fingerprint(pd.concat(list(splits.values())))
    return card


def prepare(params: config.Params, out_dir: Path = OUT_DIR) -> dict:
    """Read, validate, split and write the prepared data; return the data card."""
    data = params.data
    raw = read_table(data.source, data.revision)
    frame = validate_frame(raw, text_column=data.text_column, label_column=data.label_column, source=data.source)
    splits = split_frame(
        frame, train_size=data.train_size, val_size=data.val_size, test_size=data.test_size,
        seed=params.seed, source=data.source,
    )
    classes = sorted(frame["label"].unique())
    label_ids = {c: i for i, c in enumerate(classes)}
    card = datacard(splits, classes, data.source)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, split in splits.items():
            split = split.assign(label_id=split["label"].map(label_ids)).reset_index(drop=True)
            split.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "datacard.json", card)
    return card


def load_split(name: str, prepared_dir: Path = OUT_DIR) -> pd.DataFrame:
    return pd.read_parquet(prepared_dir / f"{name}.parquet")


@exits_cleanly
def main() -> None:
    card = prepare(config.load())
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in card["splits"].items())
    print(f"prepare: {len(card['classes'])} classes, {sizes}")  # noqa: T201


if __name__ == "__main__":
    main()
