"""benchmarks/gpu_check.sh --dry-run: every section runs on the CPU through the same code as on a
GPU and reports numbers that mean something; a failed section fails the exit code."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

SECTIONS = ["matmul", "finetune", "embed", "parity"]


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_the_dry_run_reports_every_section_with_rates_that_add_up(tmp_path: Path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["sections"]) == SECTIONS and report["failed"] == []
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    for name in SECTIONS:  # one printed line per section at least, by its name
        assert f"\n{name}: " in done.stdout, name

    matmul = report["sections"]["matmul"]
    assert set(matmul["tflops"]) == {"bf16", "fp32"}  # tf32 is CUDA's
    assert all(positive(v) for v in matmul["tflops"].values()), matmul

    tune = report["sections"]["finetune"]
    assert tune["strategy"] == "partial" and tune["precision"] == "bf16" and tune["epochs"] == 2
    for key in ("samples_per_s", "tokens_per_s", "epoch_seconds", "flops_per_epoch", "model_tflops", "mfu"):
        assert positive(tune[key]), (key, tune[key])
    assert math.isclose(tune["samples_per_s"], tune["samples_per_epoch"] / tune["epoch_seconds"], rel_tol=0.01)
    # the tiny BERT's blocks are alike: freezing 2 of 3 leaves one block's worth trained
    counts = tune["params"]
    assert (tune["freeze_layers"], tune["blocks"]) == (2, 3)
    assert counts["frozen_per_token"] == 2 * counts["trained_per_token"] > 0
    # FLOPs as the formula says: the frozen blocks ran once, before the epochs (cached)
    assert tune["frozen_cached"]
    assert tune["flops_per_epoch"] == (6 * counts["trained_per_token"] * tune["tokens_per_epoch"]
                                       + 6 * counts["trained_per_sequence"] * tune["samples_per_epoch"]
                                       + 2 * counts["frozen_per_sequence"] * tune["samples_per_epoch"])
    assert math.isclose(tune["mfu"], tune["model_tflops"] / matmul["tflops"]["bf16"], rel_tol=1e-9)
    # a 32-wide model on a CPU is far from the matmul peak; FLOPs counted 10x too many would show
    assert tune["mfu"] < 2, tune

    embed = report["sections"]["embed"]
    assert embed["texts"] == 96 and positive(embed["texts_per_s"])
    assert embed["modes"]["fp32"]["min_cosine_to_fp32"] > 0.9999 and all(  # fp32 is the reference
        positive(m["texts_per_s"]) and m["min_cosine_to_fp32"] > 0.9 for m in embed["modes"].values())

    parity = report["sections"]["parity"]
    assert parity["returncode"] == 0 and not parity["ran"] and parity["skipped_reason"]
    assert parity["collected"] >= 1 and f"{parity['collected']} test" in parity["summary"]


def test_a_failed_section_is_reported_and_fails_the_exit_code(tmp_path: Path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(*_, **__):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu_check, "matmul_peak", lambda *_, **__: {"tflops": {"bf16": 1.0}})
    monkeypatch.setattr(gpu_check, "load_backbone", lambda **_: {})
    monkeypatch.setattr(gpu_check, "finetune", lambda *_, **__: {"mfu": 0.5})
    monkeypatch.setattr(gpu_check, "embed_throughput", broken)
    monkeypatch.setattr(gpu_check, "parity", lambda **_: {"passed": 1})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert gpu_check.main() == 1
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["failed"] == ["embed"]
    assert report["sections"]["embed"] == {"status": "failed", "error": "RuntimeError: planted",
                                           "seconds": report["sections"]["embed"]["seconds"]}
    assert report["sections"]["parity"]["status"] == "ok"  # the sections after a failed one still run
    assert "embed: FAILED: RuntimeError: planted" in capsys.readouterr().out
