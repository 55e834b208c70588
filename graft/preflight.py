"""Checks run once by `graft` before any stage or Prefect machinery starts: what would otherwise
fail late, after minutes, in a traceback that names the wrong thing.

- the workspace is a git and DVC repository (DVC refuses to run in a downloaded archive);
- the workspace's tracking store is a readable SQLite database whose experiment keeps its
  artifacts inside this workspace (a copied workspace's store points at the original's);
- a missing store beside earlier artifacts is said out loud: a new registry restarts at version 1;
- the Prefect server named by PREFECT_API_URL answers (down: worth a retry, exit 75).

Each check raises a GraftError (or TransientError) with one line naming the file, path or URL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from graft import config, registry
from graft.errors import WARNING_PREFIX, GraftError, TransientError

# Commands that run stages through DVC in the workspace, and those that talk to a Prefect API.
WORKSPACE_COMMANDS = ("run", "stage", "serve", "deploy")
PREFECT_COMMANDS = ("run", "serve", "deploy")
PREFECT_HEALTH_TIMEOUT_S = 5.0
SQLITE_BUSY_TIMEOUT_S = 10.0


def check(command: str, params: config.Params, root: Path = Path(".")) -> None:
    """Every check that applies to `command`, cheapest first; warnings go to stderr."""
    if command in WORKSPACE_COMMANDS:
        require_repositories(root)
        warning = check_tracking_store(root, experiment=params.register.experiment)
        if warning:
            sys.stderr.write(f"{WARNING_PREFIX}{warning}\n")
    if command in PREFECT_COMMANDS:
        check_prefect_api()


def require_repositories(root: Path) -> None:
    """DVC needs git (stages, dvc.lock and experiments live in commits) and its own `.dvc/`."""
    where = Path(root).resolve()
    try:
        proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise GraftError(f"{where}: cannot run git ({err}); DVC needs it: install git") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "not a git repository" in said:
            raise GraftError(f"{where}: not a git repository: run `git init && git add -A && git commit`")
        raise GraftError(f"{where}: git cannot read this repository: {said}")
    if not (where / ".dvc").is_dir():
        raise GraftError(f"{where}: not a DVC repository (no .dvc/): run `dvc init`")


def check_tracking_store(root: Path, *, experiment: str) -> str | None:
    """Refuse a SQLite tracking store that cannot be read, or whose `experiment` keeps its
    artifacts outside this workspace; return a warning when a new store is about to be created
    beside the artifacts of an old one. A tracking server is its own business."""
    uri = registry.tracking_uri(root)
    db = registry._sqlite_file(uri)
    if db is None:
        return None
    artifacts = db.parent / registry.DEFAULT_ARTIFACTS
    if not db.exists():
        if artifacts.is_dir() and any(artifacts.iterdir()):
            return (f"{db} is missing but {artifacts} holds earlier artifacts: a new registry will be created at {db} "
                    f"and model versions restart at 1 (restore {db.name} to keep the old registry)")
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True,
                                                timeout=SQLITE_BUSY_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
            problem = conn.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
            location = _experiment_location(conn, experiment)
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            return None  # another run is writing it: it is readable, just not now
        raise _unreadable(db, err) from None
    except sqlite3.DatabaseError as err:
        raise _unreadable(db, err) from None
    own = db.resolve() == (Path(root) / registry.DEFAULT_TRACKING_DB).resolve()
    if own and location is not None:
        _require_inside(db, experiment, location, Path(root).resolve())
    return None


def _unreadable(db: Path, err: Exception) -> GraftError:
    return GraftError(f"{db}: the tracking store cannot be read ({err}); restore it from a backup, or move it "
                      f"and {registry.DEFAULT_ARTIFACTS}/ aside to start a new registry")


def _experiment_location(conn: sqlite3.Connection, experiment: str) -> str | None:
    """The artifact location MLflow recorded for `experiment`; None before MLflow set the store up."""
    try:
        row = conn.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
    except sqlite3.OperationalError:  # no experiments table yet: an empty store
        return None
    return row[0] if row and row[0] else None


def _require_inside(db: Path, experiment: str, location: str, workspace: Path) -> None:
    """MLflow stores absolute artifact paths: a copied or moved workspace's store would write the
    copy's models into the original's folder, or into one that no longer exists."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # an object store: shared on purpose
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(workspace):
        raise GraftError(
            f"{db}: experiment {experiment!r} keeps its artifacts in {path}, outside this workspace {workspace} "
            f"(a copied or moved workspace?); run from the original workspace, or move {db.name} and "
            f"{registry.DEFAULT_ARTIFACTS}/ aside to start a new registry here")


def prefect_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile; None: the ephemeral API."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_prefect_api(url: str | None = None, timeout: float = PREFECT_HEALTH_TIMEOUT_S) -> None:
    """A server that does not answer is a transient failure (exit 75), named before the flow
    starts; any HTTP answer, even an error, means a server is there."""
    url = url or prefect_api_url()
    if not url:
        return
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TransientError(f"PREFECT_API_URL={url}: the Prefect server does not answer ({reason}); start it, "
                             "or unset PREFECT_API_URL to run on Prefect's ephemeral API") from None
