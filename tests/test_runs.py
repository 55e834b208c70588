"""Runs sharing one workspace, as a user starts them from two terminals: each trains and
registers with its own overrides, params.yaml and `dvc status` stay as they were; a run killed
half way leaves its finished stages cached, the next run resumes there and marks it `Crashed`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft import runs

from .conftest import load_params, make_workspace, tiny_params
from .test_flow import commit


def _env(tmp_path: Path, name: str) -> dict[str, str]:
    """Each graft process gets its own Prefect home, as on two machines' worth of terminals."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / f"prefect-{name}"), PYTHONUNBUFFERED="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _graft(root: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "graft.cli", "run", "--no-push", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def test_two_runs_at_once_each_register_what_they_trained(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    commit(root)
    committed = (root / "params.yaml").read_text()
    status_before = json.loads(_dvc(root, "status", "--json"))
    first = _graft(root, _env(tmp_path, "a"), "-S", "train.lr=0.01")
    time.sleep(2)  # the second arrives while the first holds the workspace
    second = _graft(root, _env(tmp_path, "b"), "-S", "train.lr=0.002")
    outputs = [proc.communicate(timeout=900)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert sum("is busy" in out and "waiting for it to finish" in out for out in outputs) == 1
    assert all(out.count("graft: error:") == 0 for out in outputs)

    assert (root / "params.yaml").read_text() == committed
    assert json.loads(_dvc(root, "status", "--json")) == status_before
    shown = json.loads(_dvc(root, "exp", "show", "--json"))
    lr_of_experiment = {e["name"]: e["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
                        for rev in shown for e in (rev.get("experiments") or [])}
    assert sorted(lr_of_experiment.values()) == [0.002, 0.01]

    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='graft-classifier'")
    assert len(versions) == 2
    for version in versions:
        run_id = version.tags["prefect_flow_run_id"]
        experiment = next(name for name in lr_of_experiment if name.endswith(run_id[:8]))
        logged = client.get_run(version.run_id).data.params
        assert float(logged["train.lr"]) == lr_of_experiment[experiment]
    model = client.get_registered_model("graft-classifier")
    assert {str(v) for v in model.aliases.values()} <= {str(v.version) for v in versions}


def _flow_run_state(env: dict, flow_run_id: str) -> str:
    code = ("import sys; from uuid import UUID; from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c: print(c.read_flow_run(UUID(sys.argv[1])).state.type.value)")
    out = subprocess.run([sys.executable, "-c", code, flow_run_id], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_a_killed_run_leaves_finished_stages_cached_and_is_marked_crashed(tmp_path, tiny_model_dir):
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    env = _env(tmp_path, "shared")
    proc = _graft(root, env)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "Running stage 'train'" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the OOM killer, kill -9
    proc.wait()
    holder = json.loads((root / runs.HOLDER_FILE).read_text())
    assert holder["flow_run_id"], "".join(seen)[-2000:]

    resumed = _graft(root, env)
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    table = {line.split()[0]: line.split()[1] for line in output.splitlines()
             if line.split() and line.split()[0] in ("prepare", "fetch", "features", "train") and len(line.split()) == 3}
    assert table == {"prepare": "skipped", "fetch": "skipped", "features": "skipped", "train": "ran"}, output[-3000:]
    assert f"flow run {holder['flow_run_id']} was killed mid-run: marked Crashed" in output
    assert _flow_run_state(env, holder["flow_run_id"]) == "CRASHED"
    assert not (root / runs.HOLDER_FILE).exists()


@pytest.mark.parametrize("busy", [True, False])
def test_workspace_lock_says_whom_a_waiter_waits_for(tmp_path, busy):
    import threading

    messages: list[str] = []
    stale: list[str] = []
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    (tmp_path / runs.HOLDER_FILE).write_text(json.dumps({"pid": 1, "flow_run_id": "dead-run"}))
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with runs.workspace_lock(tmp_path, flow_run_id="first", on_wait=messages.append, on_stale=stale.append):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(10)
    assert stale == ["dead-run"]  # the record a killed run left behind
    if busy:
        threading.Timer(1.5, release.set).start()
        with runs.workspace_lock(tmp_path, flow_run_id="second", on_wait=messages.append):
            assert json.loads((tmp_path / runs.HOLDER_FILE).read_text())["flow_run_id"] == "second"
        assert len(messages) == 1 and "flow run first" in messages[0] and "waiting" in messages[0]
    else:
        from graft.errors import TransientError

        with pytest.raises(TransientError, match="busy"), runs.workspace_lock(
                tmp_path, flow_run_id="second", on_wait=messages.append, timeout=1):
            pass
        release.set()
    thread.join()


# DVC 3's own words, as a stage and an experiment print them
_DVC_STAGE_LOG = b"""Running stage 'prepare':
> python -m tasks.prepare
prepare: 3 classes, train=18, val=12, test=18
Generating lock file 'dvc.lock'
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add data/.gitignore dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
"""
_DVC_EXPERIMENT_LOG = b"""Reproducing experiment 'graft-x'
WARNING: No file hash info found for '/ws/.dvc/tmp/exps/standalone/tmp1/models/pretrained'. It won't be created.
WARNING: No file hash info found for '/ws/.dvc/tmp/exps/standalone/tmp1/data/raw'. It won't be created.
Stage 'prepare' didn't change, skipping
Running stage 'train':
> python -m tasks.train
train: proposed partial (best on validation)
Updating lock file 'dvc.lock'

Running stage 'evaluate':
Updating lock file 'dvc.lock'

Ran experiment(s): graft-x
To apply the results of an experiment to your workspace run:

\tdvc exp apply <exp>
"""


def _filtered(log: bytes) -> str:
    shown = runs.DvcLogFilter()
    out = [line for raw in log.splitlines(keepends=True) for line in shown.feed(raw)] + shown.close()
    return b"".join(out).decode()


def test_dvc_hints_about_what_graft_does_itself_are_left_out_of_the_log():
    assert _filtered(_DVC_STAGE_LOG) == (
        "Running stage 'prepare':\n> python -m tasks.prepare\nprepare: 3 classes, train=18, val=12, test=18\n"
        "Generating lock file 'dvc.lock'\nUpdating lock file 'dvc.lock'\n")
    assert _filtered(_DVC_EXPERIMENT_LOG) == (
        "Reproducing experiment 'graft-x'\n"
        "experiment: 2 output(s) have no version in dvc.lock yet; their stages make them\n"
        "Stage 'prepare' didn't change, skipping\nRunning stage 'train':\n> python -m tasks.train\n"
        "train: proposed partial (best on validation)\nUpdating lock file 'dvc.lock'\n\n"
        "Running stage 'evaluate':\nUpdating lock file 'dvc.lock'\n\nRan experiment(s): graft-x\n")


def test_an_experiments_stage_seconds_come_from_when_its_lines_arrived():
    lines = _DVC_EXPERIMENT_LOG.decode().splitlines()
    arrival = {"Stage 'prepare'": 10.0, "Running stage 'train'": 10.5, "Running stage 'evaluate'": 40.5}
    stamps, now = [], 0.0
    for line in lines:
        now = next((t for prefix, t in arrival.items() if line.startswith(prefix)), now)
        if line.startswith("Updating lock file") and now >= 40.5:
            now = 52.0
        stamps.append((now, line))
    rows = runs.stage_rows("\n".join(lines), ("prepare", "train", "evaluate", "register"), stamps=stamps, finished=60.0)
    assert rows == [{"stage": "prepare", "status": "skipped", "seconds": 0.5},
                    {"stage": "train", "status": "ran", "seconds": 30.0},
                    {"stage": "evaluate", "status": "ran", "seconds": 11.5},
                    {"stage": "register", "status": "not run", "seconds": 0.0}]


def test_an_experiment_pins_its_own_backbone_and_leaves_a_source_it_shares_alone(workspace, tiny_model_dir, tmp_path):
    import shutil

    from graft.layout import Layout
    from graft.pins import experiment_pins

    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    pinned = (workspace / "models/source.yaml").read_bytes()
    params = runs.params_with_overrides([f"model.ref={other}"], workspace / "params.yaml")
    assert experiment_pins(params, Layout(workspace)) == [
        f'models/source.yaml:model_source="{other}"', "models/source.yaml:model_source_commit=null",
        f'models/source.yaml:model_source_ref="{other}"', "models/source.yaml:model_source_revision=null"]
    assert experiment_pins(load_params(workspace), Layout(workspace)) == []
    assert (workspace / "models/source.yaml").read_bytes() == pinned
