"""The Prefect flow: the six stages, run through DVC so that Prefect and `dvc repro` agree on what
is stale. A stage DVC finds up to date finishes in the state `Skipped`.

A run with overrides (CLI `-S`, a deployment's or the UI's parameters) is a DVC experiment
(`dvc exp run --temp`): it runs in a temporary copy, so the committed `params.yaml` that later
runs read never changes, and `dvc exp show` lists it. One run holds the workspace at a time.
"""

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
from prefect.tasks import exponential_backoff

from graft import config, runs
from graft.errors import ERROR_PREFIX, GraftError
from graft.layout import Layout
from graft.pins import experiment_pins, local_sources_inside, write_sources

STAGES = ("prepare", "fetch", "select", "features", "adapt", "curve", "domain", "train", "evaluate", "register")


class StageFailed(GraftError):
    """A DVC command failed: `kind` says whether the input was bad, the failure may pass on its
    own (retried, exit 75), or it is internal."""

    def __init__(self, message: str, *, kind: runs.FailureKind) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = runs.EXIT_CODES[kind]

    @property
    def user_error(self) -> bool:
        return self.kind == "input"


def _subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # dvc.yaml runs `python -m tasks.X`: make `python` the interpreter graft runs in.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    run_id = _flow_run_id()
    if run_id:
        env["GRAFT_FLOW_RUN_ID"] = run_id  # lineage tag of the registered version
    env.update(extra or {})
    return env


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def run_dvc(args: list[str], root: Path, what: str, env: dict[str, str] | None = None,
            stamps: list[tuple[float, str]] | None = None) -> str:
    """Run a DVC command, streaming its output (progress bars) and keeping it for the error;
    `stamps` collects each line with the time it arrived (per-stage seconds of an experiment).

    A stage's own `graft: error:` line is held back here and raised once, with the stage's
    name, so the user reads it once; DVC's hints about what graft does itself are left out
    (`runs.DvcLogFilter`). A killed graft takes its DVC child down with it."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=_subprocess_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    captured = bytearray()
    shown = runs.DvcLogFilter()
    assert proc.stdout is not None
    try:
        for line in iter(proc.stdout.readline, b""):
            captured += line
            if stamps is not None:
                stamps.append((time.monotonic(), line.decode("utf-8", "replace")))
            if not line.startswith(ERROR_PREFIX.encode()):
                _show(shown.feed(line))
        _show(shown.close())
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    text = captured.decode("utf-8", "replace")
    if returncode == 0:
        return text
    reported = [line[len(ERROR_PREFIX):] for line in text.splitlines() if line.startswith(ERROR_PREFIX)]
    kind = runs.failure_kind(returncode, text, reported=bool(reported))
    if reported:
        raise StageFailed(f"{what}: {reported[-1]}", kind=kind)
    lines = [line for line in text.splitlines() if line.strip()]
    tail = [line for line in lines if line.startswith("ERROR")][-1:] or lines[-1:] or ["no output"]
    raise StageFailed(f"{what} failed (exit {returncode}): {tail[0].strip()}", kind=kind)


def _show(lines: list[bytes]) -> None:
    for line in lines:
        sys.stderr.buffer.write(line)
    if lines:
        sys.stderr.buffer.flush()


def _retry_transient(task_obj, task_run, state) -> bool:
    """Retry what may pass on its own (a flaky hub, a busy lock), never bad input or a bug."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.kind == "transient"


def restore_outputs(stage: str, root: Path) -> None:
    """Put a failed stage's outputs back as dvc.lock last recorded them (from the DVC cache):
    a stage that died half way may have replaced some of them already."""
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", "--quiet", stage], cwd=root,
                   env=_subprocess_env(), capture_output=True, text=True)


def repro_stage(stage: str, root: Path) -> str:
    """`dvc repro` one stage and say what DVC did: `ran`, `cached` (restored from its run cache)
    or `skipped` (up to date in dvc.lock); when it fails, its previous outputs are put back."""
    try:
        output = run_dvc(["repro", "--single-item", stage], root, f"stage {stage!r}")
    except StageFailed:
        restore_outputs(stage, root)
        raise
    return runs.stage_rows(output, (stage,))[0]["status"]


RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
           "retry_jitter_factor": 0.5, "retry_condition_fn": _retry_transient}


@task(task_run_name="{stage}", **RETRIES)
def dvc_stage(stage: str, root: str) -> Any:
    """Run one dvc.yaml stage through `dvc repro`, which decides whether it is stale; a stage up to
    date finishes as `Skipped` (one DVC process per stage: asking `dvc status` first cost a second
    process start per stage)."""
    logger = get_run_logger()
    started = time.perf_counter()
    status = repro_stage(stage, Path(root))
    seconds = round(time.perf_counter() - started, 2)
    if status == "skipped":
        logger.info("%s: up to date in dvc.lock, skipped", stage)
        return Completed(name="Skipped", message="up to date", data={"stage": stage, "status": "skipped",
                                                                    "seconds": seconds})
    logger.info("%s: %s in %.1fs", stage, "restored from DVC's run cache" if status == "cached" else "ran", seconds)
    return {"stage": stage, "status": "ran", "seconds": seconds}


@task(task_run_name="experiment", **RETRIES)
def dvc_experiment(overrides: dict[str, Any], root: str, pins: list[str] | None = None,
                   copy_paths: list[str] | None = None) -> list[dict]:
    """The whole pipeline as one DVC experiment with these overrides, in a temporary copy; `pins`
    (`FILE:KEY=VALUE`) set the copy's source files, `copy_paths` bring untracked sources along."""
    logger = get_run_logger()
    name = runs.experiment_name(_flow_run_id())
    args = ["exp", "run", "--temp", "--name", name]
    for key, value in overrides.items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    for pin in pins or []:
        args += ["-S", pin]
    for path in copy_paths or []:
        args += ["--copy-paths", path]
    started = time.perf_counter()
    stamps: list[tuple[float, str]] = []
    output = run_dvc(args, Path(root), f"experiment {name!r}", env=runs.experiment_env(Path(root), _flow_run_id()),
                     stamps=stamps)
    logger.info("experiment %s: ran in %.1fs; `dvc exp show` lists it, `dvc exp apply %s` restores it",
                name, time.perf_counter() - started, name)
    rows = runs.stage_rows(output, STAGES, stamps=stamps, finished=time.monotonic())
    return [{**row, "experiment": name} for row in rows]


@task(**{**RETRIES, "retries": 2})
def dvc_push(root: str) -> dict:
    """Push every cached output to the default DVC remote."""
    started = time.perf_counter()
    run_dvc(["push", "--quiet"], Path(root), "dvc push")
    return {"stage": "push", "status": "ran", "seconds": round(time.perf_counter() - started, 2)}


@task
def publish_run_facts(root: str) -> None:
    """What no stage may depend on, published at the edge: the evaluation summary as a Prefect
    markdown artifact; train.json (timings, throughput per epoch) and evaluate.json (seconds,
    forward passes) on the MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    from graft.files import read_json
    from graft.report import summary_markdown

    layout = Layout(Path(root))
    reports = (layout.transfer, layout.gate, layout.bias, layout.robustness)
    if all(path.exists() for path in reports):
        create_markdown_artifact(summary_markdown(*(read_json(path) for path in reports)), key="graft-evaluation",
                                 description="Transfer verdict, bias and robustness, gate")
    if not layout.registration.exists():
        return
    import mlflow

    registration = read_json(layout.registration)
    client = mlflow.MlflowClient(tracking_uri=registration["tracking_uri"])
    run_id = registration["run_id"]
    for report in layout.run_fact_reports():
        if report.exists():
            client.log_artifact(run_id, str(report), artifact_path="reports/plots" if report.parent.name == "plots"
                                else "reports")
    if layout.train_report.exists():
        for name, candidate in read_json(layout.train_report).get("candidates", {}).items():
            for row in candidate.get("throughput") or []:
                for key in ("samples_per_s", "tokens_per_s"):
                    if row.get(key) is not None:
                        client.log_metric(run_id, f"train_{name}_{key}", row[key], step=row["epoch"])
    if layout.evaluate_report.exists():
        facts = read_json(layout.evaluate_report)
        client.log_metric(run_id, "evaluate_seconds", facts["seconds"])
        for name, passes in facts.get("forward_passes", {}).items():
            client.log_metric(run_id, f"evaluate_forward_passes_{name}", passes)


def _crashed(flow_run_id: str) -> None:
    """The previous holder of the workspace was killed: its flow run must not stay `Running`."""
    if runs.mark_crashed(flow_run_id):
        get_run_logger().warning("flow run %s was killed mid-run: marked Crashed", flow_run_id)


@flow(name="graft-pipeline")
def pipeline(params: runs.ParamOverrides | None = None, overrides: list[str] | None = None,  # type: ignore[valid-type]
             root: str = ".", push: bool = True, write_params: bool = False) -> list[dict]:
    """prepare → fetch → select → features → adapt → curve → domain → train → evaluate → register, each through DVC.

    `params` (the UI's form) and `overrides` (`KEY=VALUE`, as `graft run -S`) change params for
    this run only: the run is a DVC experiment and params.yaml stays as committed, unless
    `write_params` asks for the old behaviour (overrides written into params.yaml).
    """
    logger = get_run_logger()
    workspace = Path(root)
    layout = Layout(workspace)
    params_file = workspace / config.PARAMS_FILE
    texts = [*runs.override_strings(params), *(overrides or [])]
    applied = config.apply_overrides(texts, params_file, dry_run=True)  # one clear error before any work
    # the workspace's pins follow its params.yaml; a run's own sources are pinned below
    changed = write_sources(config.load(params_file), layout)
    if changed:
        logger.info("resolved sources written: %s", ", ".join(changed))
    run_params = runs.params_with_overrides(texts, params_file) if applied else None
    if applied and not write_params:
        runs.require_git_commit(workspace)
        # pinned before any work too: a source that cannot be resolved is named now
        pins = experiment_pins(run_params, layout)
    with runs.workspace_lock(workspace, flow_run_id=_flow_run_id(), on_wait=logger.warning, on_stale=_crashed):
        if applied and not write_params:
            logger.info("overrides for this run only (a DVC experiment): %s", applied)
            # an experiment's temporary copy holds git-tracked files only: the source pins, dvc.lock,
            # the `cache: false` reports (which DVC leaves to git) and the .gitignore files DVC keeps
            # beside its outputs are staged for it, or it starts from nothing and re-runs every stage;
            # the user's index is put back afterwards
            with runs.git_index_kept(workspace):
                runs.track_files(workspace, [layout.data_source_file, layout.model_source_file,
                                             workspace / "dvc.lock", layout.reports_dir,
                                             *{out.parent / ".gitignore" for out in (layout.raw_dir,
                                                                                     layout.pretrained_dir)}])
                return dvc_experiment(applied, root, pins=pins,
                                      copy_paths=local_sources_inside(run_params, workspace))
        if applied:
            # params.yaml and the pins that follow it change only if the whole run succeeds
            with runs.files_kept([params_file, layout.data_source_file, layout.model_source_file]):
                config.apply_overrides(texts, params_file)
                write_sources(run_params, layout)
                logger.info("params.yaml overrides written (--write-params): %s", applied)
                return _workspace_stages(root, push)
        return _workspace_stages(root, push)


def _workspace_stages(root: str, push: bool) -> list[dict]:
    """The six stages in the workspace, then the run's facts and the push."""
    summary = []
    for stage in STAGES:
        outcome = dvc_stage(stage, root)
        # a skipped stage returns its `Skipped` state; the summary wants the row it carries
        summary.append(outcome.result() if isinstance(outcome, State) else outcome)
    if summary[-1]["status"] == "ran":  # a new MLflow run exists only when register ran
        publish_run_facts(root)
    if push:
        summary.append(dvc_push(root))
    return summary
