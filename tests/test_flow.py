"""The Prefect flow over DVC stages: Prefect and `dvc repro` agree on what is stale, skipped
stages show as `Skipped`, a run with overrides is a DVC experiment that leaves params.yaml as
committed, and bad input ends in one line, not a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import STAGES, StageFailed, _retry_transient, pipeline
from graft import runs
from graft.errors import GraftError

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


def commit(root: Path) -> None:
    """DVC experiments are commits on top of HEAD: give the workspace one."""
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=graft-test", "-c", "user.email=test@graft.invalid",
                                        "commit", "-qm", "workspace"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


# what a newcomer's log must not show: DVC's git hints, an experiment's hash warnings,
# transformers' report of the new head (graft says each in its own words, or handles it)
LOG_NOISE = ("To track the changes with git", "dvc config core.autostage", "No file hash info found",
             "LOAD REPORT", "newly initialized", "Consider training on your downstream task")


def graft_cli(root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`graft ARGS` in the workspace, as a user runs it (its own Prefect home and ephemeral API)."""
    import os

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-cli"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "graft.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)


def stage_table(log: str) -> dict[str, tuple[str, float]]:
    """The per-stage table `graft run` ends with: {stage: (status, seconds)}."""
    rows = [line.split() for line in log.splitlines()]
    return {row[0]: (row[1], float(row[2])) for row in rows
            if len(row) == 3 and row[0] in (*STAGES, "push")}


def assert_readable(log: str) -> None:
    assert not [noise for noise in LOG_NOISE if noise in log], log[-4000:]
    assert "stage       status    seconds" in log and any(line.startswith("total ") for line in log.splitlines())
    verdict = [line for line in log.splitlines() if ": test accuracy " in line and "gate passed=" in line]
    assert verdict, log[-4000:]


def workspace_state(root: Path) -> dict[str, str | None]:
    """What a run with overrides must leave as it was: params, pins, dvc.lock (bytes) and git's index."""
    import hashlib

    state = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() if (root / name).exists() else None
             for name in ("params.yaml", "data/source.yaml", "models/source.yaml", "dvc.lock")}
    state["git index"] = subprocess.run(["git", "ls-files", "--stage"], cwd=root, capture_output=True, text=True,
                                        check=True).stdout
    return state


def test_second_run_skips_everything_and_a_train_param_reruns_only_downstream(tmp_path, tiny_model_dir, monkeypatch):
    # the workspace's own store (an earlier in-process mlflow.set_tracking_uri exports the variable)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    commit(root)
    first = graft_cli(root, tmp_path, "run")  # as a user runs it: its log is what a newcomer reads
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert_readable(log)
    assert "partial: new classification head for 3 classes" in log  # said once, in graft's words
    assert {stage: row[0] for stage, row in stage_table(log).items()} == dict.fromkeys((*STAGES, "push"), "ran")
    assert (root / "reports/registration.json").exists() and (root / "dvc.lock").exists()
    assert "up to date" in _dvc(root, "status").lower()

    second = pipeline(root=str(root), return_state=True)
    assert [r["status"] for r in second.result()[:6]] == ["skipped"] * 6
    states = _task_states(second, expected=len(STAGES) + 1)
    assert all(states[name] == "Skipped" for name in STAGES), states
    assert "didn't change" in _dvc(root, "repro").lower() or "up to date" in _dvc(root, "repro").lower()

    committed = (root / "params.yaml").read_text()
    before = workspace_state(root)
    third = pipeline(overrides=["train.epochs=1"], root=str(root), return_state=True)
    rows = third.result()
    assert {r["stage"]: r["status"] for r in rows if r["status"] == "ran"} == {
        # select reads train.epochs (its estimate of each candidate's fine-tuning seconds, held against
        # train.budget_seconds) and curve too (the epochs of its fine-tuned points): DVC reruns both; select
        # writes the same backbone, so features and adapt stay skipped
        "select": "ran", "curve": "ran", "train": "ran", "evaluate": "ran", "register": "ran"}, rows
    assert all(r["seconds"] > 0 for r in rows if r["status"] == "ran"), rows  # timed from DVC's stage lines
    experiment = rows[0]["experiment"]
    assert (root / "params.yaml").read_text() == committed  # the override stayed in the experiment
    assert workspace_state(root) == before  # dvc.lock and the reports were staged for the copy, then unstaged
    assert "up to date" in _dvc(root, "status").lower()  # and the workspace is as the second run left it
    shown = json.loads(_dvc(root, "exp", "show", "--json"))
    exps = {e["name"]: e for rev in shown for e in (rev.get("experiments") or []) for e in e["revs"]}
    assert exps[experiment]["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1

    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlruns.db'}"  # the workspace's store, not the experiment's temporary copy
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = sorted(client.search_model_versions("name='graft-classifier'"), key=lambda v: int(v.version))
    assert len(versions) == 2
    assert client.get_run(versions[-1].run_id).data.params["train.epochs"] == "1"
    assert client.get_run(versions[0].run_id).data.params["train.epochs"] == "2"
    assert versions[-1].tags["prefect_flow_run_id"] == str(third.state_details.flow_run_id)

    fourth = pipeline(overrides=["register.experiment=graft-written"], root=str(root), write_params=True,
                      push=False, return_state=True)
    assert [r["stage"] for r in fourth.result() if r["status"] == "ran"] == ["register"]
    assert yaml.safe_load((root / "params.yaml").read_text())["register"]["experiment"] == "graft-written"


def _relabelled_copy(source: Path, out: Path, renames: dict[str, str]) -> Path:
    """Another data set of the same shape: the fixture with some classes renamed."""
    import pandas as pd

    frame = pd.read_csv(source)
    frame["label"] = frame["label"].replace(renames)
    frame.to_csv(out, index=False)
    return out


def test_a_run_pins_and_snapshots_its_own_data_source_and_leaves_the_workspace_as_committed(tmp_path, tiny_model_dir):
    """`graft run -S data.source=...` and the UI's form with data.source: each run pins its own
    source in its experiment (DVC hashes that file, prepare snapshots it), its registered version
    names it, and the workspace's params.yaml, pins, dvc.lock and git index stay as they were."""
    from mlflow import MlflowClient

    from .conftest import NEWS_CSV

    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    commit(root)
    other = _relabelled_copy(NEWS_CSV, tmp_path / "reviews.csv", {"tech": "computing"})
    before = workspace_state(root)

    run = graft_cli(root, tmp_path, "run", "--no-push", "-S", f"data.source={other}")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert_readable(log)
    cached = [out for spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
              for entry in spec.get("outs", []) for out, opts in (entry.items() if isinstance(entry, dict) else [(entry, {})])
              if (opts or {}).get("cache", True)]  # DVC warns once per cached output with no version
    assert f"experiment: {len(cached)} output(s) have no version in dvc.lock yet; their stages make them" in log
    table = stage_table(log)
    assert {stage: row[0] for stage, row in table.items()} == dict.fromkeys(STAGES, "ran"), log[-3000:]
    assert all(seconds > 0 for _, seconds in table.values()), table  # measured, not 0.0
    assert workspace_state(root) == before

    experiment = next(line.split()[1].rstrip(":") for line in log.splitlines() if line.startswith("experiment graft-"))
    ref = next(r for r in subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root,
                                         capture_output=True, text=True, check=True).stdout.split()
               if r.endswith(experiment))
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=root, capture_output=True, text=True,
                                         check=True).stdout)
    assert str(other) in [dep["path"] for dep in lock["stages"]["prepare"]["deps"]]  # DVC hashed the run's source
    assert "data/raw" in [out["path"] for out in lock["stages"]["prepare"]["outs"]]  # and prepare snapshot it

    # the UI's form, as Prefect passes it (every stage runs again: DVC keeps no run cache for stages
    # with `persist: true` outputs, and the workspace has no dvc.lock to start from)
    form = runs.ParamOverrides.model_validate({"data": {"source": str(other)}, "register": {"alias": "from-ui"}})
    rows = pipeline(params=form, root=str(root), push=False)
    assert {r["stage"]: r["status"] for r in rows} == dict.fromkeys(STAGES, "ran")
    assert workspace_state(root) == before

    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = sorted(client.search_model_versions("name='graft-classifier'"), key=lambda v: int(v.version))
    assert [v.tags["data_source"] for v in versions] == [str(other), str(other)]
    assert client.get_model_version_by_alias("graft-classifier", "from-ui").version == versions[-1].version


def test_a_failing_run_with_overrides_leaves_params_pins_and_the_git_index_as_they_were(tmp_path, tiny_model_dir):
    import pandas as pd

    from .conftest import NEWS_CSV

    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    commit(root)
    broken = tmp_path / "unlabelled.csv"
    pd.read_csv(NEWS_CSV).drop(columns=["label"]).to_csv(broken, index=False)
    (root / "NOTES.md").write_text("staged by the user\n")
    subprocess.run(["git", "add", "NOTES.md"], cwd=root, check=True)  # what the user staged stays staged
    before = workspace_state(root)
    for write_params in (True, False):
        with pytest.raises(StageFailed, match="label") as err:
            pipeline(overrides=[f"data.source={broken}"], root=str(root), push=False, write_params=write_params)
        assert err.value.user_error
        assert workspace_state(root) == before, f"write_params={write_params}"


def test_stage_error_surfaces_as_one_line(tmp_path, tiny_model_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    params = tiny_params(tiny_model_dir)
    params["model"]["ref"] = str(pickled)
    root = make_workspace(tmp_path / "ws", params)
    with pytest.raises(StageFailed) as err:
        pipeline(root=str(root), push=False)
    assert err.value.user_error
    assert str(err.value) == (
        f"stage 'fetch': {pickled}: no *.safetensors weights; graft never unpickles model files "
        "(found only ['pytorch_model.bin']: convert them to safetensors)")
    assert (root / "data/prepared/train.parquet").exists()  # what was produced before is kept


def test_an_unknown_source_is_named_before_any_stage_runs(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["model"]["ref"] = "package:no_such_model_package/model"
    root = make_workspace(tmp_path / "ws", params)
    with pytest.raises(GraftError) as err:
        pipeline(root=str(root), push=False)
    assert str(err.value) == ("package:no_such_model_package/model: no installed Python package named "
                              "'no_such_model_package' (pip install it?)")
    assert not (root / "data/prepared").exists()


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
    deployment = pipeline.to_deployment(name="graft-scheduled", cron="0 3 * * *", parameters={"root": "/srv/graft"})
    assert deployment.name == "graft-scheduled"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"root": "/srv/graft"}
    assert set(pipeline.parameters.properties) == {"params", "overrides", "root", "push", "write_params"}
    # the UI's form: every params.yaml key, typed and documented, empty (= as committed) by default
    form = pipeline.parameters.definitions
    lr = form["ParamOverridesTrain"]["properties"]["lr"]
    assert lr["anyOf"] == [{"type": "number"}, {"type": "null"}] and lr["default"] is None
    assert "learning rate" in lr["description"]
    filled = runs.ParamOverrides.model_validate({"gate": {"min_accuracy": 0}, "train": {"lr": 3e-5}})
    assert runs.override_strings(filled) == ["train.lr=3e-05", "gate.min_accuracy=0.0"]


def test_cli_run_with_a_missing_data_file_ends_in_one_line_without_traceback(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["data"]["source"] = "nowhere/data.csv"
    root = make_workspace(tmp_path / "ws", params)
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "run", "--no-push"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert len(errors) == 1
    assert errors[-1] == "graft: error: nowhere/data.csv: data file not found (set data.source in params.yaml)"


def test_overrides_without_a_git_commit_are_refused_in_one_line(tmp_path, tiny_model_dir):
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    with pytest.raises(Exception, match="need a git commit") as err:
        pipeline(overrides=["train.lr=0.1"], root=str(root))
    assert err.value.exit_code == 2


def test_transient_failures_are_retried_and_exit_75_but_input_errors_are_not(tmp_path, tiny_model_dir):
    """A hub that does not answer is worth a retry; a missing package is not."""
    from prefect.states import Failed

    params = tiny_params(tiny_model_dir)
    params["model"]["ref"] = "acme/bert"
    root = make_workspace(tmp_path / "ws", params)
    env = {"PATH": str(Path(sys.executable).parent), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HOME": str(tmp_path), "HF_HUB_DISABLE_TELEMETRY": "1"}
    # pinning the backbone's hub commit is the first thing that needs the hub
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "sources"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.startswith("graft: error: model.ref='acme/bert': cannot")

    dvc_output = "ERROR: failed to reproduce 'fetch': failed to run: python -m tasks.fetch, exited with 75"
    assert runs.failure_kind(255, dvc_output, reported=True) == "transient"
    assert runs.failure_kind(255, dvc_output.replace("75", "2"), reported=True) == "input"
    assert runs.failure_kind(1, "ERROR: Unable to acquire lock. Most likely another DVC process is running",
                             reported=False) == "transient"
    assert runs.failure_kind(255, dvc_output.replace("75", "1"), reported=False) == "internal"
    transient = StageFailed("stage 'fetch': hub down", kind="transient")
    bad = StageFailed("stage 'fetch': no such package", kind="input")
    assert _retry_transient(None, None, Failed(data=transient)) is True
    assert _retry_transient(None, None, Failed(data=bad)) is False
    assert (transient.exit_code, bad.exit_code, StageFailed("x", kind="internal").exit_code) == (75, 2, 1)
