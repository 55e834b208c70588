"""prepare: snapshot the source's bytes, validate them, split (stratified, seeded), and write
the splits, a row index and a data card a person reads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from graft import config  # noqa: E402
from graft.baselines import has_tfidf_words  # noqa: E402
from graft.dataset import (  # noqa: E402
    SPLITS,
    Validated,
    clean_unlabelled,
    fingerprint,
    split_frame,
    validate_frame,
)
from graft.errors import GraftError, exits_cleanly  # noqa: E402
from graft.files import atomic_path, atomic_write_text, write_json  # noqa: E402
from graft.layout import Layout  # noqa: E402
from graft.sources import read_source_file, read_table_with_notes, snapshot  # noqa: E402


def check_source_file(params: config.DataParams, source_file: Path) -> None:
    """The path DVC hashed (dvc.yaml `vars`) must describe the source configured now."""
    pinned = read_source_file(source_file)
    if (pinned.get("unlabelled_source_ref") != params.unlabelled_source
            or pinned.get("unlabelled_source_revision") != params.unlabelled_revision):
        raise GraftError(
            f"{source_file}: describes data.unlabelled_source={pinned.get('unlabelled_source_ref')!r}, but "
            f"params.yaml has {params.unlabelled_source!r} (revision {params.unlabelled_revision!r}); "
            "run `graft sources` (graft run does it before the stages)"
        )
    if pinned.get("data_source_ref") != params.source or pinned.get("data_source_revision") != params.revision:
        raise GraftError(
            f"{source_file}: describes data.source={pinned.get('data_source_ref')!r} "
            f"(revision {pinned.get('data_source_revision')!r}), but params.yaml has {params.source!r} "
            f"(revision {params.revision!r}); run `graft sources` (graft run does it before the stages)"
        )


def datacard(splits: dict[str, pd.DataFrame], validated: Validated, *, classes: list[str], source: str,
             group_columns: list[str], domain_column: str | None, decoding: list[str]) -> dict:
    card: dict = {"source": source, "classes": classes, "group_columns": group_columns,
                  "domain_column": domain_column, "splits": {}}
    for name, frame in splits.items():
        chars = frame["text"].str.len()
        words = frame["text"].str.split().str.len()
        card["splits"][name] = {
            "rows": len(frame),
            "per_class": {c: int((frame["label"] == c).sum()) for c in classes},
            "text_chars": {"min": int(chars.min()), "median": float(chars.median()), "max": int(chars.max())},
            "text_words": {"min": int(words.min()), "median": float(words.median()), "max": int(words.max())},
            "groups": {col: frame[col].value_counts().sort_index().to_dict() for col in group_columns},
            "fingerprint": fingerprint(frame),
        }
        if domain_column:
            card["splits"][name]["domains"] = frame["domain"].value_counts().sort_index().to_dict()
    card["validation"] = {
        "rows_valid": len(validated.frame),
        "dropped_duplicates": validated.dropped_duplicates,
        "conflicting_texts": validated.conflicts,
        "dropped_conflicts": validated.dropped_conflicts,
        "missing_group_values": validated.missing_groups,
        "decoding": decoding,
        "unused_rows": len(validated.frame) - sum(len(f) for f in splits.values()),
    }
    card["fingerprint"] = fingerprint(pd.concat(list(splits.values())))
    return card


def plot_text_lengths(splits: dict[str, pd.DataFrame], path: Path) -> None:
    """Words per text, one histogram per split (tokens, and truncation at model.max_length: the
    features stage's reports/plots/token_lengths.png)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, frame in splits.items():
        ax.hist(frame["text"].str.split().str.len(), bins=40, alpha=0.5, label=f"{name} ({len(frame)})")
    ax.set_xlabel("words per text")
    ax.set_ylabel("texts")
    ax.set_title("Text length per split")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def datacard_markdown(card: dict, plot_name: str) -> str:
    """The data card as a page a person reads."""
    classes = card["classes"]
    lines = [f"# Data card\n\nSource: `{card['source']}`  \nFingerprint: `{card['fingerprint']}`\n",
             "## Class balance\n", "| split | rows | " + " | ".join(classes) + " |",
             "|---|---:|" + "---:|" * len(classes)]
    for name, split in card["splits"].items():
        lines.append(f"| {name} | {split['rows']} | " + " | ".join(str(split["per_class"][c]) for c in classes) + " |")
    lines += ["", "## Text length", "", f"![words per text]({plot_name})", "",
              "| split | median words | min | max |", "|---|---:|---:|---:|"]
    for name, split in card["splits"].items():
        w = split["text_words"]
        lines.append(f"| {name} | {w['median']:.0f} | {w['min']} | {w['max']} |")
    lines += ["", "Words, not tokens: the train split's token lengths, the `model.max_length` used (or chosen by "
              "`auto`), what it truncates and costs are in [sequence_length.json](sequence_length.json) and "
              "[plots/token_lengths.png](plots/token_lengths.png), written by the features stage (it has the tokenizer)."]
    for column in card["group_columns"]:
        lines += ["", f"## Group column `{column}`", "", "| split | " + " | ".join(
            sorted({g for s in card["splits"].values() for g in s["groups"][column]})) + " |"]
        values = sorted({g for s in card["splits"].values() for g in s["groups"][column]})
        lines.append("|---|" + "---:|" * len(values))
        for name, split in card["splits"].items():
            lines.append(f"| {name} | " + " | ".join(str(split["groups"][column].get(v, 0)) for v in values) + " |")
    if card["domain_column"]:
        values = sorted({d for s in card["splits"].values() for d in s["domains"]})
        lines += ["", f"## Domains (`{card['domain_column']}`)", "", "| split | " + " | ".join(values) + " |",
                  "|---|" + "---:|" * len(values)]
        for name, split in card["splits"].items():
            lines.append(f"| {name} | " + " | ".join(str(split["domains"].get(v, 0)) for v in values) + " |")
    v = card["validation"]
    lines += ["", "## What validation changed", "",
              f"- valid rows: {v['rows_valid']}; rows not used by any split: {v['unused_rows']}",
              f"- exact duplicate texts dropped: {v['dropped_duplicates']}",
              f"- texts under conflicting labels: {v['conflicting_texts']} (rows dropped: {v['dropped_conflicts']})"]
    lines += [f"- missing values in `{c}`: {n} (kept as `(missing)`)" for c, n in v["missing_group_values"].items()]
    lines += [f"- decoding: {note}" for note in v["decoding"]] or ["- decoding: every file was valid UTF-8"]
    if "unlabelled" in card:
        u = card["unlabelled"]
        lines += ["", "## Unlabelled text (adaptation)", "", f"Source: `{u['source']}`", "",
                  f"- texts kept: {u['rows']} of {u['rows_read']} (empty {u['dropped_empty']}, repeated "
                  f"{u['dropped_duplicates']}, also in test {u['dropped_in_test']}, in val {u['dropped_in_val']}, "
                  f"in train {u['dropped_in_train']})",
                  "- labels in the file were ignored" if u["labels_ignored"] else "- the file has no label column"]
    return "\n".join(lines) + "\n"


def prepare_unlabelled(data: config.DataParams, splits: dict[str, pd.DataFrame], raw_dir: Path) -> tuple:
    """Snapshot and clean data.unlabelled_source: (id, text) rows and what cleaning dropped."""
    copy = snapshot(data.unlabelled_source, data.unlabelled_revision, raw_dir)
    frame, decoding = read_table_with_notes(copy, encoding_fallback=data.encoding_fallback)
    rows, counts = clean_unlabelled(frame, source=data.unlabelled_source, text_column=data.text_column,
                                    label_column=data.label_column, splits=splits)
    return rows, {"source": data.unlabelled_source, **counts, "decoding": decoding, "fingerprint": fingerprint(rows.assign(label=""))}


def prepare(params: config.Params, *, source_file: Path, raw_dir: Path, out_dir: Path, datacard_md: Path,
            plot: Path) -> dict:
    """Snapshot, read, validate, split and write the prepared data; return the data card."""
    data = params.data
    check_source_file(data, source_file)
    copy = snapshot(data.source, data.revision, raw_dir)
    raw, decoding = read_table_with_notes(copy, encoding_fallback=data.encoding_fallback)
    validated = validate_frame(
        raw, source=data.source, text_column=data.text_column, label_column=data.label_column,
        id_column=data.id_column, split_column=data.split_column, group_columns=data.group_columns,
        domain_column=data.domain_column, on_conflict=data.on_conflict,
    )
    splits = split_frame(validated.frame, train_size=data.train_size, val_size=data.val_size,
                         test_size=data.test_size, seed=params.seed, source=data.source)
    if not has_tfidf_words(splits["train"]["text"].tolist()).any():
        raise GraftError(f"{data.source}: no text of the training split has a word the TF-IDF baseline can use "
                         "(the texts with words all fell into val or test); add texts with words")
    classes = sorted(validated.frame["label"].unique())
    label_ids = {c: i for i, c in enumerate(classes)}
    card = datacard(splits, validated, classes=classes, source=data.source, group_columns=list(data.group_columns),
                    domain_column=data.domain_column, decoding=decoding)
    unlabelled = None
    if data.unlabelled_source is not None:
        unlabelled, card["unlabelled"] = prepare_unlabelled(data, splits, raw_dir / "unlabelled")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, split in splits.items():
            split.assign(label_id=split["label"].map(label_ids)).to_parquet(tmp / f"{name}.parquet", index=False)
        rows = pd.concat([split[["id", "label"]].assign(split=name) for name, split in splits.items()])
        rows.sort_values("id", kind="stable").to_parquet(tmp / "rows.parquet", index=False)
        if unlabelled is not None:
            unlabelled.to_parquet(tmp / "unlabelled.parquet", index=False)
        write_json(tmp / "datacard.json", card)
    plot_text_lengths(splits, plot)
    atomic_write_text(datacard_md, datacard_markdown(card, Path(plot).relative_to(datacard_md.parent).as_posix()))
    return card


@exits_cleanly
def main() -> None:
    layout = Layout()
    card = prepare(config.load(), source_file=layout.data_source_file, raw_dir=layout.raw_dir,
                   out_dir=layout.prepared_dir, datacard_md=layout.datacard_md,
                   plot=layout.plots_dir / "text_lengths.png")
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in card["splits"].items())
    dropped = card["validation"]["dropped_duplicates"] + card["validation"]["dropped_conflicts"]
    print(f"prepare: {len(card['classes'])} classes, {sizes}; {dropped} row(s) dropped; "  # noqa: T201
          f"fingerprint {card['fingerprint'][:12]}")


if __name__ == "__main__":
    main()


__all__ = ["SPLITS", "prepare"]
