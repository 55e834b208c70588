"""Tests harm no neighbour: a test finds the process it signals among its own descendants, never by
name machine-wide, where another pipeline's stage of the same name may be running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import wait_for_descendant


def test_the_victim_is_found_among_the_tests_own_descendants_only(tmp_path: Path):
    # a stand-in `tasks.train` that only sleeps, for this test's process tree and for a neighbour's
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "train.py").write_text("import time\ntime.sleep(60)\n")
    # graft -> dvc -> `sh -c "python -m tasks.train"`: the stage is a grandchild (`; :` keeps the shell)
    ours = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -m tasks.train; :"], cwd=tmp_path,
                            start_new_session=True)
    neighbour = None
    try:
        victim = wait_for_descendant(ours, ("-m", "tasks.train"), timeout=30)
        # another pipeline's train stage, started last: a search by name, newest first, finds it
        neighbour = subprocess.Popen([sys.executable, "-m", "tasks.train"], cwd=tmp_path, start_new_session=True)
        assert wait_for_descendant(ours, ("-m", "tasks.train"), timeout=30) == victim
        assert victim not in (neighbour.pid, ours.pid)  # the python process, not the shell around it
    finally:
        for proc in (ours, neighbour):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # each in its own session: this test's processes only
                proc.wait()

