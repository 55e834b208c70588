"""prepare: validation errors name the problem; the split is stratified and deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from graft.errors import GraftError
from graft.files import read_json
from tasks.prepare import OUT_DIR, prepare

from .conftest import NEWS_CSV, load_params


def test_split_sizes_stratified_and_card(workspace: Path):
    card = prepare(load_params(workspace))
    sizes = {name: len(pd.read_parquet(OUT_DIR / f"{name}.parquet")) for name in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 12, "test": 18}
    assert card["classes"] == ["food", "sport", "tech"]
    for split in ("train", "val", "test"):
        assert card["splits"][split]["per_class"] == {"food": sizes[split] // 3, "sport": sizes[split] // 3,
                                                      "tech": sizes[split] // 3}
    frames = [pd.read_parquet(OUT_DIR / f"{n}.parquet") for n in ("train", "val", "test")]
    ids = [set(f["id"]) for f in frames]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set(frames[0].columns) >= {"id", "text", "label", "label_id", "region"}
    assert read_json(OUT_DIR / "datacard.json") == card


def test_split_is_deterministic_and_independent_of_row_order(workspace: Path, tmp_path: Path):
    first = prepare(load_params(workspace))
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(NEWS_CSV).sample(frac=1, random_state=3).to_csv(shuffled, index=False)
    params = load_params(workspace)
    second = prepare(params.model_copy(update={"data": params.data.model_copy(update={"source": str(shuffled)})}))
    assert first["fingerprint"] == second["fingerprint"]
    assert first["splits"]["test"]["fingerprint"] == second["splits"]["test"]["fingerprint"]


def test_class_folders_are_read(workspace: Path, tmp_path: Path):
    root = tmp_path / "folders"
    for label, rows in pd.read_csv(NEWS_CSV).groupby("label"):
        (root / label).mkdir(parents=True)
        for row in rows.itertuples():
            (root / label / f"{row.id}.txt").write_text(row.text)
    params = load_params(workspace)
    card = prepare(params.model_copy(update={"data": params.data.model_copy(update={"source": str(root)})}))
    assert card["classes"] == ["food", "sport", "tech"] and card["splits"]["train"]["rows"] == 18


def _with_source(workspace: Path, frame: pd.DataFrame, name: str = "bad.csv"):
    path = workspace / name
    frame.to_csv(path, index=False)
    params = load_params(workspace)
    return params.model_copy(update={"data": params.data.model_copy(update={"source": str(path)})}), path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(lambda f: f.drop(columns=["text"]), r"missing column\(s\) \['text'\]"),
     (lambda f: f.assign(text=f["text"].where(f.index != 5, "  ")), r"1 empty text\(s\) in column 'text', rows \[5\]"),
     (lambda f: f.assign(label="sport"), "has 1 class"),
     (lambda f: f.head(20), "20 rows, but data.train_size")],
)
def test_bad_data_is_named(workspace: Path, mutate, expected: str):
    params, path = _with_source(workspace, mutate(pd.read_csv(NEWS_CSV)))
    with pytest.raises(GraftError, match=expected) as err:
        prepare(params)
    assert str(path) in str(err.value)


def test_failed_run_keeps_previous_output(workspace: Path):
    prepare(load_params(workspace))
    before = (OUT_DIR / "train.parquet").read_bytes()
    params, _ = _with_source(workspace, pd.read_csv(NEWS_CSV).drop(columns=["label"]))
    with pytest.raises(GraftError):
        prepare(params)
    assert (OUT_DIR / "train.parquet").read_bytes() == before
    assert not [p for p in OUT_DIR.parent.iterdir() if p.name.endswith(".tmp")]


def test_stage_reports_a_missing_file_in_one_line(workspace: Path):
    text = (workspace / "params.yaml").read_text().replace(str(NEWS_CSV), "nowhere/data.csv")
    (workspace / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=workspace, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "graft: error: nowhere/data.csv: data file not found (set data.source in params.yaml)"
