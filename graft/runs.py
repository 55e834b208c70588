"""How pipeline runs share one workspace: one run at a time (a waiter says whom it waits for),
runs with overrides as DVC experiments (`dvc exp run --temp`) so `params.yaml` never changes,
a run killed without a chance to clean up marked `Crashed` by the next one, and failures
classified into the exit codes users and schedulers act on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from graft import config
from graft.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_TRANSIENT, GraftError
from graft.files import atomic_path

FailureKind = Literal["input", "transient", "internal"]
LOCK_FILE = Path(".dvc/tmp/graft-run.lock")
HOLDER_FILE = Path(".dvc/tmp/graft-run.json")
# DVC's own words for a workspace another DVC process holds, and for a network hiccup
_TRANSIENT_PATTERNS = re.compile(
    r"Unable to acquire lock|lock file|Connection (refused|reset|aborted)|timed out|Temporary failure in name resolution",
    re.IGNORECASE)
_STAGE_EXIT = re.compile(r"exited with (-?\d+)")


def failure_kind(returncode: int, output: str, *, reported: bool) -> FailureKind:
    """Bad input (a stage reported it: exit 2), transient (exit 75, a busy lock, the network),
    or internal (anything else: a bug worth a report)."""
    codes = [int(c) for c in _STAGE_EXIT.findall(output)]
    stage_code = codes[-1] if codes else returncode
    if stage_code == EXIT_TRANSIENT or (not reported and _TRANSIENT_PATTERNS.search(output)):
        return "transient"
    if stage_code == EXIT_BAD_INPUT and reported:
        return "input"
    return "internal"


EXIT_CODES: dict[FailureKind, int] = {"input": EXIT_BAD_INPUT, "transient": EXIT_TRANSIENT,
                                      "internal": EXIT_INTERNAL}


@contextlib.contextmanager
def workspace_lock(root: Path, *, flow_run_id: str | None, on_wait: Callable[[str], Any],
                   on_stale: Callable[[str], Any] | None = None, timeout: float | None = None) -> Iterator[None]:
    """Hold the workspace for one run. A second run waits (and says for whom) rather than
    failing on DVC's lock; a holder record left by a killed run is handed to `on_stale`."""
    lock_path, holder_path = Path(root) / LOCK_FILE, Path(root) / HOLDER_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(holder_path)
            who = f"pid {holder.get('pid')}, flow run {holder.get('flow_run_id')}" if holder else "another run"
            on_wait(f"workspace {Path(root).resolve()} is busy ({who}); waiting for it to finish")
            _wait_for(handle, timeout)
        stale = _read_holder(holder_path)
        if stale and on_stale is not None and stale.get("flow_run_id") and stale.get("flow_run_id") != flow_run_id:
            on_stale(str(stale["flow_run_id"]))  # its holder died without removing its record
        holder_path.write_text(json.dumps({"pid": os.getpid(), "flow_run_id": flow_run_id,
                                           "since": datetime.now(timezone.utc).isoformat()}))
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                holder_path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(handle, timeout: float | None) -> None:
    from graft.errors import TransientError

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() > deadline:
                raise TransientError(f"workspace still busy after {timeout:.0f}s; try again later") from None
            time.sleep(1)


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def mark_crashed(flow_run_id: str) -> bool:
    """Set a flow run that still shows `Running` (its process was killed) to `Crashed`."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state is None or run.state.is_final():
                return False
            client.set_flow_run_state(run.id, Crashed(message="its process was killed; marked by the next graft run"),
                                      force=True)
            return True
    except Exception:  # the record may come from another Prefect API: nothing to fix there
        return False


def experiment_env(root: Path, flow_run_id: str | None) -> dict[str, str]:
    """What a stage needs in an experiment's temporary copy: the workspace's tracking store
    (not the copy's, which is deleted) and the flow run that started it (lineage)."""
    from graft.registry import tracking_uri

    env = {"MLFLOW_TRACKING_URI": tracking_uri(Path(root))}
    if flow_run_id:
        env["GRAFT_FLOW_RUN_ID"] = flow_run_id
    return env


def experiment_name(flow_run_id: str | None) -> str:
    """A git-ref-safe experiment name that ties `dvc exp show` back to the Prefect run."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"graft-{stamp}-{(flow_run_id or 'cli')[:8]}"


_STAGE_LINE = re.compile(
    r"^(?:(?P<ran>Running stage) '(?P<a>[\w-]+)'|Stage '(?P<b>[\w-]+)' (?P<how>didn't change|is cached))")
_LOCK_UPDATED = re.compile(r"^(Generating|Updating) lock file")


def stage_rows(output: str, stages: tuple[str, ...], *, stamps: list[tuple[float, str]] | None = None,
               finished: float | None = None) -> list[dict]:
    """Per-stage outcome of one `dvc exp run`, read from DVC's own log lines; with `stamps` (each
    line and when it arrived), a stage's seconds run from its first line to the next stage's (the
    last one: to its last lock-file update, or `finished`)."""
    seen: dict[str, str] = {}
    for line in output.splitlines():
        match = _STAGE_LINE.match(line.strip())
        if match:
            stage = match["a"] or match["b"]
            seen[stage] = "ran" if match["ran"] else ("cached" if match["how"] == "is cached" else "skipped")
    seconds = _stage_seconds(stamps, finished) if stamps else {}
    return [{"stage": s, "status": seen.get(s, "not run"), "seconds": round(seconds.get(s, 0.0), 2)}
            for s in stages]


def _stage_seconds(stamps: list[tuple[float, str]], finished: float | None) -> dict[str, float]:
    starts: list[tuple[str, float]] = []
    last_lock = None
    for when, line in stamps:
        match = _STAGE_LINE.match(line.strip())
        if match:
            starts.append((match["a"] or match["b"], when))
        elif _LOCK_UPDATED.match(line.strip()):
            last_lock = when
    out: dict[str, float] = {}
    for i, (stage, began) in enumerate(starts):
        if i + 1 < len(starts):
            ended = starts[i + 1][1]
        else:
            ended = last_lock if last_lock is not None and last_lock >= began else (finished or began)
        out[stage] = out.get(stage, 0.0) + max(ended - began, 0.0)
    return out


# DVC's advice about what graft does itself: stage dvc.lock in git (the user commits it with the
# pins), push (graft run pushes), apply an experiment (graft's last line says how)
_HINT_STARTS = ("To track the changes with git, run:", "To enable auto staging, run:",
                "To apply the results of an experiment to your workspace run:")
_PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
# an experiment's copy checks out every output dvc.lock knows; one it has no version of yet is
# made by its stage, which DVC warns about once per output
_NO_HASH = re.compile(r"^WARNING: No file hash info found for '.*'\. It won't be created\.$")


class DvcLogFilter:
    """DVC's log without the hints and warnings about what graft already handles; the rest
    (stage lines, the stages' own output, progress bars) passes unchanged, line by line."""

    def __init__(self) -> None:
        self._in_hint = False
        self._blank: list[bytes] = []  # blank lines wait: the one before a hint goes with it
        self._no_hash = 0

    def feed(self, line: bytes) -> list[bytes]:
        """The lines to show now for one line of DVC's output."""
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if self._in_hint:
            if not text.strip() or text.startswith("\t"):
                return []
            self._in_hint = False
        if not text.strip():
            self._blank.append(line)
            return []
        if text in _HINT_STARTS:
            self._in_hint, self._blank = True, []
            return []
        if text == _PUSH_HINT:
            return []
        if _NO_HASH.match(text):
            self._no_hash += 1
            return []
        out = [*self._pending_note(), *self._blank, line]
        self._blank = []
        return out

    def close(self) -> list[bytes]:
        """What is still held back when DVC's output ends (trailing blank lines are dropped)."""
        return self._pending_note()

    def _pending_note(self) -> list[bytes]:
        if not self._no_hash:
            return []
        note = f"experiment: {self._no_hash} output(s) have no version in dvc.lock yet; their stages make them\n"
        self._no_hash = 0
        return [note.encode()]


def experiment_file(root: Path, name: str, path: Path) -> str | None:
    """A file as experiment `name` committed it (its DVC experiment ref), or None."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root,
                          capture_output=True, text=True, check=False).stdout.split()
    ref = next((r for r in refs if r.endswith(f"/{name}")), None)
    if ref is None:
        return None
    relative = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    shown = subprocess.run(["git", "show", f"{ref}:{relative}"], cwd=root, capture_output=True, text=True, check=False)
    return shown.stdout if shown.returncode == 0 else None


def _optional_model(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (None: keep params.yaml's value), docs kept."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _optional_model(annotation, f"{name}{key.title()}")
        fields[key] = (annotation | None, Field(None, description=info.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


# The Prefect UI renders this as a form: every params.yaml key, typed, documented, empty by default.
ParamOverrides = _optional_model(config.Params, "ParamOverrides")


def override_strings(values: BaseModel | dict | None) -> list[str]:
    """The filled-in fields of a ParamOverrides as `KEY=VALUE` strings (as `graft run -S`)."""
    if values is None:
        return []
    raw = values.model_dump(exclude_none=True) if isinstance(values, BaseModel) else values
    out: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if inner is not None:
                    walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out.append(f"{prefix}={json.dumps(value)}")

    walk("", raw)
    return out


def require_git_commit(root: Path) -> None:
    """DVC experiments are commits on top of HEAD: a repository without one cannot hold them."""
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GraftError(f"{Path(root).resolve()}: runs with overrides are DVC experiments and need a git commit "
                         "(git add -A && git commit), or pass --write-params to edit params.yaml instead")


def track_files(workspace: Path, paths: list[Path]) -> None:
    """`git add` files the pipeline writes and the user commits (the source pins, dvc.lock, the
    `cache: false` reports), so a DVC experiment's temporary copy has them; run it inside
    `git_index_kept`, which puts the user's index back afterwards."""
    existing = [str(Path(p).relative_to(workspace)) for p in paths if Path(p).exists()]
    if existing:
        subprocess.run(["git", "add", "--", *existing], cwd=workspace, capture_output=True, check=False)


@contextlib.contextmanager
def git_index_kept(workspace: Path) -> Iterator[None]:
    """Git's index as it was before, whether the run succeeds or fails: what graft stages for an
    experiment's copy is graft's business, what the user staged is theirs."""
    proc = subprocess.run(["git", "rev-parse", "--git-path", "index"], cwd=workspace, capture_output=True,
                          text=True, check=False)
    index = Path(workspace) / proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None
    with files_kept([index] if index else [], always=True):
        yield


@contextlib.contextmanager
def files_kept(paths: list[Path], *, always: bool = False) -> Iterator[None]:
    """Put these files back byte for byte (or remove them, if they did not exist) when the body
    fails, or always."""
    saved = {Path(p): Path(p).read_bytes() if Path(p).exists() else None for p in paths}

    def restore() -> None:
        for path, content in saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.exists() or path.read_bytes() != content:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(content)

    try:
        yield
    except BaseException:
        restore()
        raise
    if always:
        restore()


def params_with_overrides(overrides: list[str], params_file: Path) -> config.Params:
    """The params a run with these overrides sees, validated; params.yaml itself is not touched."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="graft-params-") as tmp:
        copy = Path(tmp) / params_file.name
        shutil.copyfile(params_file, copy)
        config.apply_overrides(overrides, copy)
        return config.load(copy)
