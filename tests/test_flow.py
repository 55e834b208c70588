"""The Prefect flow over DVC stages: Prefect and `dvc repro` agree on what is stale, skipped
stages show as `Skipped`, and bad input ends in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import STAGES, StageFailed, pipeline

from .conftest import make_workspace, tiny_params


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_states(flow_state, expected: int) -> dict[str, str]:
    """Task-run state names as the Prefect API holds them (task runs reach it as events: poll)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
            states = {run.name: run.state.name for run in runs if run.state and run.state.is_final()}
            if len(states) >= expected or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def test_second_run_skips_everything_and_a_train_param_reruns_only_downstream(tmp_path, tiny_model_dir):
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    first = pipeline(root=str(root), return_state=True)
    assert [r["status"] for r in first.result()] == ["ran"] * 7  # six stages + push
    assert (root / "reports/registration.json").exists() and (root / "dvc.lock").exists()
    assert "up to date" in _dvc(root, "status").lower()

    second = pipeline(root=str(root), return_state=True)
    assert [r["status"] for r in second.result()[:6]] == ["skipped"] * 6
    states = _task_states(second, expected=len(STAGES) + 1)
    assert all(states[name] == "Skipped" for name in STAGES), states
    assert "didn't change" in _dvc(root, "repro").lower() or "up to date" in _dvc(root, "repro").lower()

    third = pipeline(overrides=["train.epochs=1"], root=str(root), return_state=True)
    ran = [r["stage"] for r in third.result()[:6] if r["status"] == "ran"]
    assert ran == ["train", "evaluate", "register"]
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"] == 1
    assert "up to date" in _dvc(root, "status").lower()


def test_stage_error_surfaces_as_one_line(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["model"]["ref"] = "package:no_such_model_package/model"
    root = make_workspace(tmp_path / "ws", params)
    with pytest.raises(StageFailed) as err:
        pipeline(root=str(root), push=False)
    assert err.value.user_error
    assert str(err.value) == (
        "stage 'fetch': package:no_such_model_package/model: no installed Python package named "
        "'no_such_model_package' (pip install it?)")
    assert (root / "data/prepared/train.parquet").exists()  # what was produced before is kept


def test_cli_rejects_an_unknown_params_key_in_one_line(tmp_path, tiny_model_dir):
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "run", "-S", "train.learning_rate=1"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "graft: error: params.yaml: unknown parameter key(s) in override: train.learning_rate"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "run"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.learning_rate: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_deployment_carries_the_schedule_and_overridable_parameters():
    deployment = pipeline.to_deployment(name="graft-scheduled", cron="0 3 * * *",
                                        parameters={"overrides": [], "root": "/srv/graft"})
    assert deployment.name == "graft-scheduled"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"overrides": [], "root": "/srv/graft"}
    assert set(pipeline.parameters.properties) == {"overrides", "root", "push"}


def test_cli_run_with_a_missing_data_file_ends_in_one_line_without_traceback(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["data"]["source"] = "nowhere/data.csv"
    root = make_workspace(tmp_path / "ws", params)
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "run", "--no-push"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert errors[-1] == (
        "graft: error: stage 'prepare': nowhere/data.csv: data file not found (set data.source in params.yaml)")
