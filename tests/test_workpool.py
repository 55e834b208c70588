"""The pipeline on a Prefect work pool, as a team with a Prefect server runs it: `prefect server
start` on a loopback port, `graft deploy --pool` in a workspace, `prefect worker start --pool`
as a child, a run triggered through the API with the UI form's `params` (what "Custom run"
posts), and the registered version in the workspace's MLflow registry. Every process is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft import servers
from graft.deployment import PREFECT_YAML

from .conftest import REPO, make_workspace, tiny_params
from .test_flow import commit

pytestmark = pytest.mark.servers
POOL = "graft-test-pool"
NAME = "graft-classifier"
# a worker polls its pool every PREFECT_WORKER_QUERY_SECONDS (10 by default): the run starts sooner
FAST_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}


def _tail(path: Path) -> str:
    return f"--- {path.name} (tail) ---\n{path.read_text()[-4000:]}\n" if path.exists() else ""


def _kill_flow_run_process(run) -> None:
    """A run still going when the test gives up: the process worker started it in its own
    session (`infrastructure_pid` is `host:pid`), so stopping the worker leaves it running."""
    pid = (run.infrastructure_pid or "").rpartition(":")[2]
    if run.state is not None and not run.state.is_final() and pid.isdigit():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), 9)


def test_a_worker_runs_the_deployed_pipeline_from_the_workspace_and_it_registers(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from graft.registry import tracking_uri

    started = time.monotonic()
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    shutil.copy2(REPO / PREFECT_YAML, root / PREFECT_YAML)
    commit(root)  # a run with the form's params is a DVC experiment: it starts from a commit
    committed_params = (root / "params.yaml").read_text()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1", **FAST_WORKER)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the workspace's own mlruns.db
        env.pop(key, None)

    with servers.prefect_server(servers.free_port(), home=tmp_path / "prefect-home",
                                log=tmp_path / "server.log") as url:
        env["PREFECT_API_URL"] = url
        deployed = subprocess.run([sys.executable, "-m", "graft.cli", "deploy", "--pool", POOL], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        full_name = f"graft-pipeline/{_spec_name(root)}"
        assert f"deployed {full_name} to the process work pool {POOL!r} (created)" in deployed.stdout

        with open(tmp_path / "worker.log", "ab") as log:
            # the workspace venv's interpreter: the worker runs each flow run with its own Python
            worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                                      cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        run = None
        try:
            with SyncPrefectClient(url) as client:
                deployment = client.read_deployment_by_name(full_name)
                assert "ParamOverridesTrain" in json.dumps(deployment.parameter_openapi_schema)  # the UI's form
                assert deployment.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(root.resolve())}}]
                run = client.create_flow_run_from_deployment(
                    deployment.id, parameters={"params": {"train": {"epochs": 1}}})
                deadline = time.monotonic() + 900
                while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
                    assert worker.poll() is None, f"the worker exited with code {worker.returncode}"
                    time.sleep(1)
                    run = client.read_flow_run(run.id)
                assert run.state.is_completed(), run.state
        except BaseException:
            sys.stderr.write(_tail(tmp_path / "worker.log") + _tail(tmp_path / "server.log"))
            raise
        finally:
            servers.stop(worker)
            if run is not None:
                _kill_flow_run_process(run)

    registry = MlflowClient(tracking_uri=tracking_uri(root), registry_uri=tracking_uri(root))
    versions = registry.search_model_versions(f"name='{NAME}'")
    assert [v.tags["prefect_flow_run_id"] for v in versions] == [str(run.id)]
    logged = registry.get_run(versions[0].run_id)
    assert logged.data.params["train.epochs"] == "1"  # the form's value reached the run
    assert (root / "params.yaml").read_text() == committed_params
    sys.stderr.write(f"work-pool test: {time.monotonic() - started:.1f}s\n")


def _spec_name(root: Path) -> str:
    from graft.deployment import read_spec

    return read_spec(root / PREFECT_YAML).name
