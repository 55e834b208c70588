"""graft against real servers, as users run it: `graft serve` on the embedded default (it starts
`prefect server start` itself), an `mlflow server` on SQLite, a UI-style run with overrides
through the Prefect API, a run nobody triggered fired by the schedule, and the champion served
by `mlflow models serve`. The servers are shared by the module; every process is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from graft import servers

from .conftest import make_workspace, tiny_params
from .test_flow import commit

pytestmark = pytest.mark.servers
NAME = "graft-classifier"
COMMITTED_MIN_ACCURACY = 0.99  # the tiny model never reaches it: a run that used it fails the gate


class Stack:
    """The servers and workspace the tests share."""

    def __init__(self, root: Path, prefect_url: str, mlflow_url: str, env: dict[str, str]) -> None:
        self.root, self.prefect_url, self.mlflow_url, self.env = root, prefect_url, mlflow_url, env
        self.committed_params = (root / "params.yaml").read_text()
        self.ui_run_finished = None

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.prefect_url)

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def wait_flow_run(self, flow_run_id: UUID, timeout: float = 900):
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    return run
                time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout}s")

    def mlflow_runs_of(self, flow_run_ids: list[UUID]) -> list:
        """The MLflow runs that these flow runs logged (a flow run whose register stage was up to
        date logs none)."""
        wanted = {str(i) for i in flow_run_ids}  # MLflow's search has no IN for tags
        runs = self.mlflow().search_runs([self.mlflow().get_experiment_by_name("graft").experiment_id])
        return [run for run in runs if run.data.tags.get("prefect_flow_run_id") in wanted]

    def mlflow_run_of(self, flow_run_id: UUID):
        runs = self.mlflow_runs_of([flow_run_id])
        assert len(runs) == 1, f"{len(runs)} MLflow runs for flow run {flow_run_id}"
        return runs[0]


def _start(cmd: list[str], *, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("servers")
    params = tiny_params(tiny_model_dir)
    params["gate"]["min_accuracy"] = COMMITTED_MIN_ACCURACY
    params["register"]["promotion"]["verdicts"] = ["positive", "no_gain", "negative"]
    root = make_workspace(base / "ws", params)
    commit(root)
    mlflow_port, prefect_port = servers.free_port(), servers.free_port()
    mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    # the venv's bin first: `mlflow models serve` starts `uvicorn` by name, as in an activated venv
    env = dict(os.environ, PREFECT_HOME=str(base / "prefect-home"), MLFLOW_TRACKING_URI=mlflow_url, MLFLOW_REGISTRY_URI=mlflow_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PREFECT_API_URL", None)  # the embedded default: graft serve starts the server itself
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                            cwd=base, env=env, log=base / "mlflow.log"))
        # a schedule every minute: the next run is at most a minute ahead
        procs.append(_start([sys.executable, "-m", "graft.cli", "serve", "--cron", "* * * * *", "--port",
                             str(prefect_port)], cwd=root, env=env, log=base / "serve.log"))
        servers.wait_http(f"{mlflow_url}/health", procs[0], 180, "mlflow server")
        servers.wait_http(f"{prefect_url}/health", procs[1], 240, "graft serve's prefect server")
        yield Stack(root, prefect_url, mlflow_url, env)
    finally:
        for proc in reversed(procs):
            servers.stop(proc)
        for log in ("serve.log", "mlflow.log"):
            if (base / log).exists():
                sys.stderr.write(f"--- {log} (tail) ---\n{(base / log).read_text()[-4000:]}\n")


def _deployment_id(stack: Stack) -> UUID:
    deadline = time.monotonic() + 180
    with stack.client() as client:
        while True:
            try:
                return client.read_deployment_by_name("graft-pipeline/graft-scheduled").id
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def test_ui_run_with_overrides_registers_in_the_mlflow_server_and_leaves_params_yaml(stack: Stack):
    deployment = _deployment_id(stack)
    with stack.client() as client:
        schema = client.read_deployment(deployment).parameter_openapi_schema
        assert "ParamOverridesGate" in json.dumps(schema)  # the UI's form has the typed params
        # what the UI's "Custom run" posts: the form's values as the flow's parameters
        triggered = client.create_flow_run_from_deployment(deployment, parameters={"params": {"gate": {"min_accuracy": 0}}})
    run = stack.wait_flow_run(triggered.id)
    assert run.state.is_completed(), run.state
    stack.ui_run_finished = run.end_time
    assert (stack.root / "params.yaml").read_text() == stack.committed_params

    logged = stack.mlflow_run_of(triggered.id)
    assert logged.data.params["gate.min_accuracy"] == "0.0" and logged.data.tags["gate_passed"] == "True"
    versions = stack.mlflow().search_model_versions(f"name='{NAME}'")
    assert [v.run_id for v in versions] == [logged.info.run_id]
    assert versions[0].tags["prefect_flow_run_id"] == str(triggered.id)
    assert stack.mlflow().get_model_version_by_alias(NAME, "champion").version == versions[0].version


def test_a_scheduled_run_fires_by_itself_and_uses_the_committed_params(stack: Stack):
    deployment = _deployment_id(stack)
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    def finished_scheduled_runs() -> list:
        with stack.client() as client:
            return [r for r in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
                if r.auto_scheduled]

    # a run nobody triggered that started after the UI run with gate.min_accuracy=0 had finished
    deadline = time.monotonic() + 600
    while True:
        done = [r for r in finished_scheduled_runs()
                if stack.ui_run_finished is None or r.start_time > stack.ui_run_finished]
        if done or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done, "no scheduled flow run finished within 10 minutes"
    scheduled = min(done, key=lambda r: r.expected_start_time)
    assert scheduled.state.is_completed(), scheduled.state
    assert scheduled.parameters.get("params") is None  # nobody filled in the form
    # the UI run's override did not leak: the workspace's gate used the committed threshold
    gate = json.loads((stack.root / "reports/gate.json").read_text())
    assert {c["name"]: c["threshold"] for c in gate["checks"]}["min_accuracy"] == COMMITTED_MIN_ACCURACY
    assert gate["passed"] is False
    assert (stack.root / "params.yaml").read_text() == stack.committed_params

    # Scheduled runs that fired while the UI run held the workspace waited on its lock; whichever
    # took it first ran register, the others found every stage up to date and logged no MLflow run
    # (which of them wins is up to the lock, not the schedule). Every scheduled run that did log
    # one logged the committed value.
    logged = stack.mlflow_runs_of([r.id for r in finished_scheduled_runs()])
    assert logged, "no scheduled flow run logged an MLflow run"
    assert {run.data.params["gate.min_accuracy"] for run in logged} == {str(COMMITTED_MIN_ACCURACY)}
    assert {run.data.tags["gate_passed"] for run in logged} == {"False"}


def test_the_served_champion_answers_with_labels_and_probabilities(stack: Stack, tmp_path: Path):
    port = servers.free_port()
    proc = _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                  cwd=tmp_path, env=stack.env, log=tmp_path / "serve-model.log")
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/ping", proc, 180, "mlflow models serve")
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [
            ["Bread recipe bake kitchen flavour."], ["Cloud data robot internet computer."]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        servers.stop(proc)
    assert len(predictions) == 2
    for row in predictions:
        probabilities = {k: v for k, v in row.items() if k.startswith("probability_")}
        assert row["label"] in {k.removeprefix("probability_") for k in probabilities}
        assert abs(sum(probabilities.values()) - 1) < 1e-4 and row["probability"] == max(probabilities.values())
