"""Faults in register: a run SIGKILLed right after MLflow created its version leaves a
half-registered version (no alias, no lineage, no card, its run RUNNING); the next run finds
it, marks it and ends its run FAILED, and registers its own version."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft.layout import Layout
from tasks.register import register

from .conftest import load_params

pytestmark = pytest.mark.hostile
NAME = "graft-classifier"

# The register stage, stopped right after MLflow printed "Created version": the parent then
# SIGKILLs it by its PID (nothing after that line runs, as with a kill at that moment).
STALLED_REGISTER = r'''
import sys, time
from graft import registry
def stall(*args, **kwargs):
    sys.stderr.write("GRAFT-TEST: stalled after the version was created\n")
    sys.stderr.flush()
    time.sleep(600)
registry.wait_ready = stall
from tasks.register import main
main()
'''


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} from the register child (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_version_half_registered_by_a_killed_run_is_marked_and_its_run_failed_by_the_next(
        all_strategies_evaluated: Path, tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    root = tmp_path / "ws"
    shutil.copytree(all_strategies_evaluated, root, symlinks=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    log = tmp_path / "register-killed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", STALLED_REGISTER], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, "MLFLOW_TRACKING_URI": uri}, start_new_session=True)
    try:
        wait_for_line(log, "GRAFT-TEST: stalled", proc, 300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by its PID
        proc.wait()
    assert "Created version '1'" in log.read_text()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    half = client.get_model_version(NAME, "1")
    assert half.status == "READY" and "graft_status" not in half.tags
    assert client.get_run(half.run_id).info.status == "RUNNING"  # the scene the next run finds

    monkeypatch.chdir(root)
    result = register(load_params(root), Layout(root), uri=uri)
    assert result["version"] == "2" and result["aliases"] == ["challenger", "champion"]
    assert [v["version"] for v in result["abandoned_versions"]] == ["1"]
    assert result["abandoned_versions"][0]["run_status_was"] == "RUNNING"
    marked = client.get_model_version(NAME, "1")
    assert marked.tags["graft_status"] == "abandoned"
    assert "half-registered" in marked.tags["abandoned_reason"]
    assert marked.description.startswith("**ABANDONED, do not use**: half-registered")
    assert client.get_run(half.run_id).info.status == "FAILED"
    assert client.get_model_version(NAME, "2").tags["graft_status"] == "registered"

    # marked once: a third run finds nothing left to mark
    again = register(load_params(root), Layout(root), uri=uri)
    assert again["version"] == "3" and again["abandoned_versions"] == []
