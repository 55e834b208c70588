"""The Prefect flow: the six stages, run through DVC so that Prefect and `dvc repro` agree on what
is stale. A stage DVC finds up to date finishes in the state `Skipped`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Completed, State

from graft import config
from graft.errors import ERROR_PREFIX, GraftError
from graft.layout import Layout
from graft.pins import write_sources

STAGES = ("prepare", "fetch", "features", "train", "evaluate", "register")


class StageFailed(GraftError):
    """A DVC stage exited non-zero; `user_error` when the stage reported bad input (exit 2)."""

    def __init__(self, message: str, *, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


def stage_is_stale(stage: str, root: Path) -> bool:
    """Ask DVC (not a guess of ours) whether the stage's deps, params or outs changed."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=root, env=_subprocess_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status {stage}: {proc.stderr.strip() or proc.stdout.strip()}", user_error=False)
    return bool(json.loads(proc.stdout or "{}"))


def _subprocess_env() -> dict[str, str]:
    # dvc.yaml runs `python -m tasks.X`: make `python` the interpreter graft runs in.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_dvc(args: list[str], root: Path, what: str) -> None:
    """Run a DVC command, streaming its stderr (progress bars) and keeping it for the error."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=_subprocess_env(),
                            stderr=subprocess.PIPE)
    captured = bytearray()
    assert proc.stderr is not None
    while chunk := proc.stderr.read1(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        captured += chunk
    if proc.wait() == 0:
        return
    text = captured.decode("utf-8", "replace")
    reported = [line[len(ERROR_PREFIX):] for line in text.splitlines() if line.startswith(ERROR_PREFIX)]
    if reported:
        raise StageFailed(f"{what}: {reported[-1]}", user_error=True)
    tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
    raise StageFailed(f"{what} failed (exit {proc.returncode}): {tail[0].strip()}", user_error=False)


def _retry_unless_bad_input(task_obj, task_run, state) -> bool:
    """Retry I/O failures (a flaky hub), never a reported input problem."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailed) and error.user_error)


def restore_outputs(stage: str, root: Path) -> None:
    """Put a failed stage's outputs back as dvc.lock last recorded them (from the DVC cache):
    a stage that died half way may have replaced some of them already."""
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", "--quiet", stage], cwd=root,
                   env=_subprocess_env(), capture_output=True, text=True)


@task(task_run_name="{stage}", retries=0)
def dvc_stage(stage: str, root: str) -> Any:
    """Run one dvc.yaml stage if DVC finds it stale; otherwise finish as `Skipped`."""
    logger = get_run_logger()
    started = time.perf_counter()
    if not stage_is_stale(stage, Path(root)):
        logger.info("%s: up to date in dvc.lock, skipped", stage)
        return Completed(name="Skipped", message="up to date", data={"stage": stage, "status": "skipped",
                                                                    "seconds": round(time.perf_counter() - started, 2)})
    try:
        run_dvc(["repro", "--single-item", stage], Path(root), f"stage {stage!r}")
    except StageFailed:
        restore_outputs(stage, Path(root))
        raise
    seconds = round(time.perf_counter() - started, 2)
    logger.info("%s: ran in %.1fs", stage, seconds)
    return {"stage": stage, "status": "ran", "seconds": seconds}


@task(retries=2, retry_delay_seconds=5)
def dvc_push(root: str) -> dict:
    """Push every cached output to the default DVC remote."""
    started = time.perf_counter()
    run_dvc(["push", "--quiet"], Path(root), "dvc push")
    return {"stage": "push", "status": "ran", "seconds": round(time.perf_counter() - started, 2)}


@flow(name="graft-pipeline")
def pipeline(overrides: list[str] | None = None, root: str = ".", push: bool = True) -> list[dict]:
    """prepare → fetch → features → train → evaluate → register, each through DVC.

    `overrides` are `KEY=VALUE` strings (as `graft run -S`): written into params.yaml after
    validation, so DVC sees them and the run is reproducible from git.
    """
    logger = get_run_logger()
    params_file = Path(root) / config.PARAMS_FILE
    applied = config.apply_overrides(list(overrides or []), params_file)
    if applied:
        logger.info("params.yaml overrides applied: %s", applied)
    params = config.load(params_file)
    changed = write_sources(params, Layout(Path(root)))
    if changed:
        logger.info("resolved sources written: %s", ", ".join(changed))
    summary = []
    for stage in STAGES:
        options = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _retry_unless_bad_input}
        stage_task = dvc_stage.with_options(**options) if stage == "fetch" else dvc_stage
        outcome = stage_task(stage, root)
        # a skipped stage returns its `Skipped` state; the summary wants the row it carries
        summary.append(outcome.result() if isinstance(outcome, State) else outcome)
    if push:
        summary.append(dvc_push(root))
    return summary
