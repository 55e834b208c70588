"""Resume and scale-out, each in real subprocesses: a run SIGKILLed mid-epoch resumes from its
last checkpoint to the same weights as an uninterrupted run; 2 gloo processes under torchrun
match one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

CHILD = Path(__file__).with_name("fit_child.py")
REPO = Path(__file__).resolve().parents[1]
# one thread per process: the two DDP ranks share the machine, and runs compare like with like
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_child(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, str(CHILD), *args] if launcher else [sys.executable, str(CHILD), *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path: Path, tiny_model_dir: Path):
    # 30 rows, batch 3: 10 steps per epoch; checkpoints every 3 steps; killed inside step 16
    # (epoch 2, 6th batch), so the last checkpoint is step 15, mid-epoch, and step 16 is lost.
    common = ["--model", str(tiny_model_dir), "--checkpoint-every", "3"]
    killed = run_child(*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(tmp_path / "ck"),
                       "--kill-at-step", "16")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["step"] == 15 and state["epoch"] == 2 and len(state["history"]) == 1
    resumed = run_child(*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(tmp_path / "ck"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 15" in resumed.stdout
    straight = run_child(*common, "--out", str(tmp_path / "straight"), "--checkpoints", str(tmp_path / "ck2"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    a, b = load_file(str(tmp_path / "resumed" / "weights.safetensors")), load_file(str(tmp_path / "straight" / "weights.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((tmp_path / "resumed" / "history.json").read_text()) == \
        json.loads((tmp_path / "straight" / "history.json").read_text())


def test_two_gloo_processes_match_one_process(tmp_path: Path, tiny_model_dir: Path):
    common = ["--model", str(tiny_model_dir), "--batch-size", "6", "--no-dropout"]
    single = run_child(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_child(*common, "--out", str(tmp_path / "ddp"),
                    launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_file(str(tmp_path / "single" / "weights.safetensors")), load_file(str(tmp_path / "ddp" / "weights.safetensors"))
    assert one.keys() == two.keys() and one
    for key in one:
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, atol=1e-5, err_msg=key)
    pretrained = load_file(str(tiny_model_dir / "model.safetensors"))
    key = "encoder.layer.1.output.dense.weight"
    assert not np.array_equal(one[f"bert.{key}"], pretrained[key])  # it trained: the match is not vacuous


def test_gradient_accumulation_equals_the_full_batch(tmp_path: Path, tiny_model_dir: Path):
    common = ["--model", str(tiny_model_dir), "--batch-size", "6", "--no-dropout"]
    full = run_child(*common, "--out", str(tmp_path / "full"))
    accumulated = run_child(*common, "--out", str(tmp_path / "acc"), "--grad-accumulation", "3")
    assert full.returncode == 0 and accumulated.returncode == 0, accumulated.stderr[-2000:]
    one, two = load_file(str(tmp_path / "full" / "weights.safetensors")), load_file(str(tmp_path / "acc" / "weights.safetensors"))
    for key in one:
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, atol=1e-5, err_msg=key)
