"""The pipeline on a Prefect work pool, as a team with a Prefect server runs it: `prefect server
start` on a loopback port, `graft deploy --pool` in a workspace, `prefect worker start --pool`
as a child, a run triggered through the API with the UI form's `params` (what "Custom run"
posts), and the registered version in the workspace's MLflow registry (marked `servers`; every
process is stopped). Also: prefect.yaml names the flow, and no server is a clear exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from graft import servers
from graft.deployment import PREFECT_YAML, read_spec

from .conftest import REPO, make_workspace, tiny_params
from .test_flow import commit
from .test_servers import _start

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


def _committed_workspace(root: Path, model_dir: Path) -> Path:
    root = make_workspace(root, tiny_params(model_dir))
    shutil.copy2(REPO / PREFECT_YAML, root / PREFECT_YAML)
    commit(root)  # a run with the form's params is a DVC experiment: it starts from a commit
    return root


def _deploy_with_a_worker(client, root: Path, env: dict, logs: dict[str, Path],
                          procs: list[subprocess.Popen]) -> str:
    """`graft deploy --pool POOL` in the workspace; the worker starts as soon as the pool exists,
    while graft deploy loads the flow. Returns the deployment's full name."""
    from prefect.exceptions import ObjectNotFound

    procs.append(_start([sys.executable, "-m", "graft.cli", "deploy", "--pool", POOL], cwd=root, env=env,
                        log=logs["deploy"]))
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(ObjectNotFound):
            client.read_work_pool(POOL)
            break
        assert procs[0].poll() is None, f"graft deploy exited ({procs[0].returncode}): {logs['deploy'].read_text()}"
        assert time.monotonic() < deadline, f"graft deploy did not create the pool {POOL!r}"
        time.sleep(0.5)
    # the worker runs each flow run with its own interpreter: the workspace venv's
    procs.append(_start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], cwd=root.parent, env=env,
                        log=logs["worker"]))
    assert procs[0].wait(timeout=300) == 0, logs["deploy"].read_text()
    full_name = f"graft-pipeline/{read_spec(root / PREFECT_YAML).name}"
    assert f"deployed {full_name} to the process work pool {POOL!r} (created)" in logs["deploy"].read_text()
    return full_name


def _wait_final(client, run, worker: subprocess.Popen, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker exited with code {worker.returncode}"
        time.sleep(1)
        run = client.read_flow_run(run.id)
    return run


def test_prefect_yaml_names_the_pipeline_flow_and_a_pool():
    from flows.pipeline import pipeline

    spec = read_spec(REPO / PREFECT_YAML)
    path, _, function = spec.entrypoint.partition(":")
    assert (REPO / path).resolve() == Path(sys.modules[pipeline.fn.__module__].__file__).resolve()
    assert function == pipeline.fn.__name__ and spec.work_pool and spec.name


def test_deploy_without_a_prefect_server_is_bad_input(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path))  # no profile that names a server either
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-m", "graft.cli", "deploy", "--pool", POOL], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("graft: error: a work-pool deployment needs a Prefect server")


@pytest.mark.servers
def test_a_worker_runs_the_deployed_pipeline_from_the_workspace_and_it_registers(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from graft.registry import tracking_uri

    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - started - sum(phases.values()), 1)

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_SERVER_UI_ENABLED", "false")  # the server starts without copying the UI
    env = dict(os.environ, PREFECT_HOME=str(home), PYTHONUNBUFFERED="1", **FAST_WORKER)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the workspace's own mlruns.db
        env.pop(key, None)
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "deploy", "worker")}
    procs: list[subprocess.Popen] = []
    run = None
    with ThreadPoolExecutor(1) as background:
        workspace = background.submit(_committed_workspace, tmp_path / "ws", tiny_model_dir)  # while the server starts
        with servers.prefect_server(servers.free_port(), home=home, log=logs["server"]) as url, \
                SyncPrefectClient(url) as client:
            root = workspace.result()
            committed_params = (root / "params.yaml").read_text()
            env["PREFECT_API_URL"] = url
            phase("workspace + server")
            try:
                deployment = client.read_deployment_by_name(_deploy_with_a_worker(client, root, env, logs, procs))
                phase("graft deploy")
                assert "ParamOverridesTrain" in json.dumps(deployment.parameter_openapi_schema)  # the UI's form
                assert deployment.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(root.resolve())}}]
                # what the UI's "Custom run" posts
                run = client.create_flow_run_from_deployment(deployment.id, parameters={"params": {"train": {"epochs": 1}}})
                run = _wait_final(client, run, procs[1])
                assert run.state.is_completed(), run.state
                phase("run")
                phases["of which until Running"] = round((run.start_time - run.created).total_seconds(), 1)
            except BaseException:
                sys.stderr.write("".join(_tail(log) for log in logs.values()))
                raise
            finally:
                for proc in reversed(procs):
                    servers.stop(proc)
                if run is not None:
                    _kill_flow_run_process(run)

    registry = MlflowClient(tracking_uri=tracking_uri(root), registry_uri=tracking_uri(root))
    versions = registry.search_model_versions(f"name='{NAME}'")
    assert [v.tags["prefect_flow_run_id"] for v in versions] == [str(run.id)]
    logged = registry.get_run(versions[0].run_id)
    assert logged.data.params["train.epochs"] == "1"  # the form's value reached the run
    assert (root / "params.yaml").read_text() == committed_params
    sys.stderr.write(f"work-pool test: {time.monotonic() - started:.1f}s {phases}\n")
