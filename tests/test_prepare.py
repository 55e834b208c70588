"""prepare: every defect that silently ruins a fine-tune is named with file, row and column;
the split is stratified, deterministic and keyed on content; the data card says what changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from graft.errors import GraftError
from graft.files import read_json
from graft.layout import Layout

from .conftest import NEWS_CSV, load_params, run_prepare


def _with(params, **data):
    return params.model_copy(update={"data": params.data.model_copy(update=data)})


def test_split_sizes_stratified_snapshot_and_card(workspace: Path):
    card = run_prepare(workspace)
    layout = Layout(workspace)
    frames = {name: pd.read_parquet(layout.split_file(name)) for name in ("train", "val", "test")}
    assert {n: len(f) for n, f in frames.items()} == {"train": 18, "val": 12, "test": 18}
    assert card["classes"] == ["food", "sport", "tech"]
    for split, frame in frames.items():
        assert card["splits"][split]["per_class"] == {c: len(frame) // 3 for c in card["classes"]}
    ids = [set(f["id"]) for f in frames.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert read_json(layout.datacard) == card
    # the bytes prepare read are in the snapshot, byte for byte
    assert (layout.raw_dir / NEWS_CSV.name).read_bytes() == NEWS_CSV.read_bytes()
    assert set(pd.read_parquet(layout.rows_index)["split"]) == {"train", "val", "test"}
    page = layout.datacard_md.read_text()
    assert "| train | 18 | 6 | 6 | 6 |" in page and "![words per text](plots/text_lengths.png)" in page
    assert (layout.plots_dir / "text_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_ids_come_from_content_so_row_order_does_not_matter(workspace: Path, tmp_path: Path):
    source = tmp_path / "no_ids.csv"
    pd.read_csv(NEWS_CSV).drop(columns=["id"]).to_csv(source, index=False)
    first = run_prepare(workspace, _with(load_params(workspace), source=str(source)))
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(source).sample(frac=1, random_state=3).to_csv(shuffled, index=False)
    second = run_prepare(workspace, _with(load_params(workspace), source=str(shuffled)))
    assert first["splits"]["test"]["fingerprint"] == second["splits"]["test"]["fingerprint"]
    assert first["fingerprint"] == second["fingerprint"]
    assert pd.read_parquet(Layout(workspace).split_file("train"))["id"].str.startswith("sha-").all()


def test_user_split_group_and_domain_columns_are_carried(workspace: Path, tmp_path: Path):
    frame = pd.read_csv(NEWS_CSV)
    frame["split"] = ["train", "train", "val", "test"] * 12
    frame["gender"] = ["f", "m", None, "f"] * 12
    frame["site"] = ["a", "b"] * 24
    source = tmp_path / "split.csv"
    frame.to_csv(source, index=False)
    params = _with(load_params(workspace), source=str(source), split_column="split", group_columns=["gender", "region"],
                   domain_column="site")
    card = run_prepare(workspace, params)
    assert {n: s["rows"] for n, s in card["splits"].items()} == {"train": 24, "val": 12, "test": 12}
    train = pd.read_parquet(Layout(workspace).split_file("train"))
    assert {"gender", "region", "domain"} <= set(train.columns)
    assert card["group_columns"] == ["gender", "region"] and card["domain_column"] == "site"
    assert card["validation"]["missing_group_values"] == {"gender": 12, "region": 0}
    assert "## Group column `gender`" in Layout(workspace).datacard_md.read_text()


def test_class_folders_are_read(workspace: Path, tmp_path: Path):
    root = tmp_path / "folders"
    for label, rows in pd.read_csv(NEWS_CSV).groupby("label"):
        (root / label).mkdir(parents=True)
        for row in rows.itertuples():
            (root / label / f"{row.id}.txt").write_text(row.text)
    card = run_prepare(workspace, _with(load_params(workspace), source=str(root)))
    assert card["classes"] == ["food", "sport", "tech"] and card["splits"]["train"]["rows"] == 18
    assert (Layout(workspace).raw_dir / "folders" / "food").is_dir()


def _csv(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


def test_duplicates_are_dropped_and_counted(workspace: Path, tmp_path: Path):
    frame = pd.read_csv(NEWS_CSV)
    extra = frame.head(3).assign(id=["x1", "x2", "x3"])
    source = _csv(tmp_path, pd.concat([frame, extra]))
    card = run_prepare(workspace, _with(load_params(workspace), source=str(source)))
    assert card["validation"]["dropped_duplicates"] == 3
    assert "exact duplicate texts dropped: 3" in Layout(workspace).datacard_md.read_text()


def test_conflicting_labels_can_be_dropped(workspace: Path, tmp_path: Path):
    frame = pd.read_csv(NEWS_CSV)
    twin = frame.head(2).assign(id=["x1", "x2"], label=["sport", "tech"])  # rows 1-2 are tech, food
    frame = pd.concat([frame, pd.concat([frame] * 1).head(0), twin])
    source = _csv(tmp_path, pd.concat([frame, pd.read_csv(NEWS_CSV).head(0)]).reset_index(drop=True))
    params = _with(load_params(workspace), source=str(source), on_conflict="drop", train_size=15, val_size=12,
                   test_size=15)
    card = run_prepare(workspace, params)
    assert card["validation"]["conflicting_texts"] == 2 and card["validation"]["dropped_conflicts"] == 4


def test_invalid_utf8_is_refused_or_decoded_with_the_named_fallback(workspace: Path, tmp_path: Path):
    source = tmp_path / "latin.csv"
    raw = NEWS_CSV.read_bytes().replace(b"Bread recipe", "Bread £3 recipe".encode("latin-1"))
    source.write_bytes(raw)
    with pytest.raises(GraftError) as err:
        run_prepare(workspace, _with(load_params(workspace), source=str(source), encoding_fallback=None))
    offset = raw.index(b"\xa3")
    assert str(err.value) == (f"{Layout(workspace).raw_dir / 'latin.csv'}: line 5: invalid UTF-8 (byte "
                              f"{offset}: b'\\xa3'); set data.encoding_fallback (e.g. cp1252) to "
                              "decode such lines with that codec")
    card = run_prepare(workspace, _with(load_params(workspace), source=str(source), encoding_fallback="latin-1"))
    assert card["validation"]["decoding"] == ["latin.csv: 1 line(s) decoded as latin-1 (lines 5)"]
    texts = pd.concat(pd.read_parquet(Layout(workspace).split_file(s)) for s in ("train", "val", "test"))["text"]
    assert texts.str.contains("Bread £3 recipe").sum() == 1


def _defect(name: str):
    base = pd.read_csv(NEWS_CSV)
    if name == "missing column":
        return base.drop(columns=["text"]), {}, (
            "{src}: missing column(s) ['text']; found ['id', 'label', 'region'] (set data.text_column / label_column / "
            "group_columns / split_column / domain_column in params.yaml)")
    if name == "empty text":
        return base.assign(text=base["text"].where(~base.index.isin([4, 9]), "   ")), {}, (
            "{src}: column 'text': 2 empty or whitespace-only text(s), rows [5, 10]")
    if name == "missing label":
        return base.assign(label=base["label"].where(base.index != 2, None)), {}, (
            "{src}: column 'label': 1 missing label(s), row [3]")
    if name == "conflicting labels":
        twin = base.head(1).assign(id="x1", label="sport")
        return pd.concat([base, twin]).reset_index(drop=True), {}, (
            "{src}: column 'label': 1 text(s) appear under two or more labels, rows [1, 49] "
            "(set data.on_conflict: drop to drop them)")
    if name == "duplicate ids":
        return base.assign(id=base["id"].where(base.index != 7, base["id"][0])), {}, (
            "{src}: column 'id': 2 row(s) share an id with a different text, rows [1, 8]; ids must be unique")
    if name == "class too small":
        return pd.concat([base, base.head(1).assign(id="x", label="odd", text="a lonely odd text")]), {}, (
            "{src}: class(es) too small to reach train, val and test (rows per class: {{'odd': 1}}); each needs at least 3")
    if name == "train_size below classes":
        return base, {"train_size": 2}, (
            "{src}: data.train_size=2 is below the number of classes (3); a stratified split needs one row per class")
    if name == "sizes cannot be met":
        return base.head(40), {}, (
            "{src}: 40 rows after validation, but data.train_size + data.val_size + data.test_size ask for 48")
    if name == "bad split value":
        return base.assign(split=["train", "val", "test", "tset"] * 12), {"split_column": "split"}, (
            "{src}: column 'split': 12 value(s) not in ['train', 'val', 'test'] (found ['tset']), rows [4, 8, 12, 16, "
            "20, 24, 28, 32, 36, 40, … 2 more]")
    raise AssertionError(name)


DEFECTS = ["missing column", "empty text", "missing label", "conflicting labels", "duplicate ids", "class too small",
           "train_size below classes", "sizes cannot be met", "bad split value"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_one_exact_line(workspace: Path, tmp_path: Path, defect: str):
    frame, data, expected = _defect(defect)
    source = _csv(tmp_path, frame)
    with pytest.raises(GraftError) as err:
        run_prepare(workspace, _with(load_params(workspace), source=str(source), **data))
    assert str(err.value) == expected.format(src=source)


def test_several_defects_are_reported_at_once(workspace: Path, tmp_path: Path):
    base = pd.read_csv(NEWS_CSV)
    frame = base.assign(text=base["text"].where(base.index != 0, ""), label=base["label"].where(base.index != 1, None))
    source = _csv(tmp_path, frame)
    with pytest.raises(GraftError) as err:
        run_prepare(workspace, _with(load_params(workspace), source=str(source)))
    assert str(err.value).splitlines() == [
        f"{source}: column 'text': 1 empty or whitespace-only text(s), row [1]",
        f"{source}: column 'label': 1 missing label(s), row [2]"]


def test_failed_prepare_keeps_previous_output(workspace: Path, tmp_path: Path):
    run_prepare(workspace)
    layout = Layout(workspace)
    before = {p.name: p.read_bytes() for p in layout.prepared_dir.iterdir()}
    source = _csv(tmp_path, pd.read_csv(NEWS_CSV).drop(columns=["label"]))
    with pytest.raises(GraftError):
        run_prepare(workspace, _with(load_params(workspace), source=str(source)))
    assert {p.name: p.read_bytes() for p in layout.prepared_dir.iterdir()} == before
    assert not [p for p in layout.prepared_dir.parent.iterdir() if p.name.endswith(".tmp")]


def test_stage_reports_a_missing_file_in_one_line(workspace: Path):
    text = (workspace / "params.yaml").read_text().replace(str(NEWS_CSV), "nowhere/data.csv")
    (workspace / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "sources"], cwd=workspace, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "graft: error: nowhere/data.csv: data file not found (set data.source in params.yaml)"


def test_stale_source_pin_is_named(workspace: Path, tmp_path: Path):
    other = _csv(tmp_path, pd.read_csv(NEWS_CSV))
    text = (workspace / "params.yaml").read_text().replace(str(NEWS_CSV), str(other))
    (workspace / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=workspace, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "run `graft sources`" in proc.stderr and str(other) in proc.stderr


def test_a_stage_whose_inputs_are_missing_names_the_stage_to_run_first(workspace: Path):
    proc = subprocess.run([sys.executable, "-m", "tasks.features"], cwd=workspace, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("graft: error: models/pretrained/config.json: input not found; run the 'select' "
                                   "stage first (graft stage select)")
