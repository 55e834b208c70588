"""Run graft's stages in a benchmark's scratch workspace, in-process and without DVC or MLflow,
through each stage's own entry point (`tasks.<stage>.main`, which reads params.yaml and the
layout of the working folder): a benchmark cannot drift from a stage's signature."""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from graft import config
from graft.layout import Layout
from graft.pins import write_sources


@contextlib.contextmanager
def inside(root: Path):
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def run_stages(root: Path, stages: Iterable[str]) -> dict[str, float]:
    """Pin the sources of `root/params.yaml`, run `stages` in order in `root`, return seconds per
    stage. A stage that exits non-zero (a named graft error, already printed) raises."""
    seconds = {}
    with inside(root):
        write_sources(config.load(root / "params.yaml"), Layout(root))
        for stage in stages:
            entry = importlib.import_module(f"tasks.{stage}").main
            started = time.perf_counter()
            try:
                entry()
            except SystemExit as err:
                if err.code not in (0, None):
                    raise RuntimeError(f"stage {stage} failed in {root} (exit {err.code})") from None
            seconds[stage] = round(time.perf_counter() - started, 1)
    return seconds
