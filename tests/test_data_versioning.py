"""DVC's "up to date" means it: the raw data and the backbone are versioned, a changed source
makes its stage stale, a version can be pulled back, and a failed or killed stage loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import NEWS_CSV, build_tiny_bert, make_workspace, tiny_params, wait_for_descendant

pytestmark = pytest.mark.slow


def _run(root: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1",
           # dvc.yaml runs `python -m tasks.X`: the interpreter running the tests
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return proc


def graft(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(root, sys.executable, "-m", "graft.cli", *args, check=check)


def dvc(root: Path, *args: str) -> str:
    return _run(root, sys.executable, "-m", "dvc", *args).stdout


def stale(root: Path) -> set[str]:
    return set(json.loads(dvc(root, "status", "--json") or "{}"))


def commit(root: Path, message: str) -> None:
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def set_param(root: Path, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    section, _, name = key.partition(".")
    params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Path:
    """A workspace whose data CSV and model folder live outside it, run once and committed."""
    base = tmp_path_factory.mktemp("versioning")
    source = base / "outside" / "news.csv"
    source.parent.mkdir()
    shutil.copyfile(NEWS_CSV, source)
    model = build_tiny_bert(base / "outside" / "model", pd.read_csv(NEWS_CSV)["text"].tolist())
    root = make_workspace(base / "ws", tiny_params(model, source))
    graft(root, "run", "--no-push")
    commit(root, "first run")
    assert stale(root) == set()
    return root


def test_relabelling_the_source_in_place_is_seen_and_diffed(ran: Path):
    root = ran
    source = Path(yaml.safe_load((root / "params.yaml").read_text())["data"]["source"])
    before = json.loads((root / "data/prepared/datacard.json").read_text())["fingerprint"]
    frame = pd.read_csv(source)
    flipped = {0: "sport", 1: "tech", 2: "sport"}  # rows 1-3 are tech, food, tech
    for row, label in flipped.items():
        assert frame.loc[row, "label"] != label
        frame.loc[row, "label"] = label
    frame.to_csv(source, index=False)

    assert "prepare" in stale(root)
    out = graft(root, "run", "--no-push").stdout
    ran_stages = [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ran"]]
    assert ran_stages[:1] == ["prepare"] and "fetch" not in ran_stages
    after = json.loads((root / "data/prepared/datacard.json").read_text())["fingerprint"]
    assert after != before
    info = json.loads(graft(root, "data", "--json").stdout)
    assert info["changes"]["relabelled"] == 3 and info["changes"]["added"] == info["changes"]["removed"] == 0
    assert sorted(info["changes"]["relabelled_ids"]) == sorted(frame.loc[list(flipped), "id"])
    assert "3 relabelled" in graft(root, "data").stdout
    commit(root, "relabelled")


def test_a_source_inside_the_repo_is_versioned_too(ran: Path):
    root = ran
    inside = root / "data" / "news.csv"
    shutil.copyfile(NEWS_CSV, inside)
    set_param(root, "data.source", "data/news.csv")
    graft(root, "stage", "prepare")
    assert yaml.safe_load((root / "data/source.yaml").read_text())["data_source"] == "data/news.csv"
    assert "prepare" not in stale(root)
    frame = pd.read_csv(inside)
    frame.loc[5, "label"] = "tech" if frame.loc[5, "label"] != "tech" else "food"
    frame.to_csv(inside, index=False)
    assert "prepare" in stale(root)
    graft(root, "stage", "prepare")
    assert "prepare" not in stale(root)


def test_a_changed_local_model_folder_makes_fetch_stale(ran: Path):
    root = ran
    model = Path(yaml.safe_load((root / "params.yaml").read_text())["model"]["ref"])
    assert "fetch" not in stale(root)
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert "fetch" in stale(root)
    graft(root, "stage", "fetch")
    assert "fetch" not in stale(root)


def test_push_then_pull_into_a_clean_clone_restores_the_same_data(ran: Path, tmp_path: Path):
    root = ran
    graft(root, "run", "--no-push")  # the tests before this one ran single stages
    dvc(root, "push", "--quiet")
    commit(root, "pushed")
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(root), str(clone))
    assert not (clone / "data/raw").exists() and not (clone / ".dvc/cache").exists()
    dvc(clone, "pull", "--quiet")
    assert stale(clone) == set(), dvc(clone, "status")
    for path in ("data/raw", "data/prepared", "models/pretrained", "models/finetuned", "models/baselines"):
        assert tree_digest(clone / path) == tree_digest(root / path), path
    fingerprint = json.loads((clone / "data/prepared/datacard.json").read_text())["fingerprint"]
    assert fingerprint == json.loads((root / "data/prepared/datacard.json").read_text())["fingerprint"]


def test_a_bad_data_file_through_graft_run_leaves_the_previous_data(ran: Path, tmp_path: Path):
    root = ran
    source = root / "data" / "news.csv"
    good = source.read_bytes()
    before = {p: tree_digest(root / p) for p in ("data/raw", "data/prepared")}
    pd.read_csv(NEWS_CSV).assign(label=lambda f: f["label"].where(f.index != 3, None)).to_csv(source, index=False)
    proc = graft(root, "run", "--no-push", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert errors[-1] == "graft: error: stage 'prepare': data/news.csv: column 'label': 1 missing label(s), row [4]"
    assert {p: tree_digest(root / p) for p in before} == before
    source.write_bytes(good)


def test_a_bad_model_folder_leaves_the_previous_backbone(ran: Path, tmp_path: Path):
    root = ran
    model_ref = yaml.safe_load((root / "params.yaml").read_text())["model"]["ref"]
    before = tree_digest(root / "models/pretrained")
    pickled = tmp_path / "pickled"
    shutil.copytree(model_ref, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    set_param(root, "model.ref", str(pickled))
    proc = graft(root, "run", "--no-push", check=False)
    assert proc.returncode == 2
    assert f"graft: error: stage 'fetch': {pickled}: no *.safetensors weights; graft never unpickles model files" in proc.stderr
    assert tree_digest(root / "models/pretrained") == before

    truncated = tmp_path / "truncated"
    shutil.copytree(model_ref, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    set_param(root, "model.ref", str(truncated))
    proc = graft(root, "run", "--no-push", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert errors[-1].startswith(f"graft: error: stage 'fetch': {truncated}: corrupt or truncated safetensors weights")
    assert "Traceback" not in proc.stderr and proc.stderr.count("Running command") <= 1
    assert tree_digest(root / "models/pretrained") == before
    set_param(root, "model.ref", model_ref)


def test_sigkill_during_train_leaves_the_previous_models(ran: Path):
    root = ran
    graft(root, "stage", "train")  # whatever earlier tests changed, train is up to date now
    before = {p: tree_digest(root / p) for p in ("models/finetuned", "models/baselines")}
    epochs = yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"]
    # far more epochs than 6 s can train on any machine, none stopped early (patience 1 ended 40
    # epochs of the tiny model within 6 s, exit 0, so the kill found no process)
    patience = yaml.safe_load((root / "params.yaml").read_text())["train"]["patience"]
    set_param(root, "train.epochs", 2000)
    set_param(root, "train.patience", None)
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "stage", "train"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    # the victim is this test's own grandchild (graft -> dvc -> the stage), never another
    # pipeline's train stage running on the same machine
    pid = wait_for_descendant(proc, ("-m", "tasks.train"), timeout=120)
    time.sleep(6)  # mid-training: past the first model's first steps
    assert proc.poll() is None, f"train ended within 6 s (exit {proc.returncode}): nothing left to kill"
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert {p: tree_digest(root / p) for p in before} == before
    set_param(root, "train.epochs", epochs)
    set_param(root, "train.patience", patience)


def test_retraining_with_nothing_changed_leaves_evaluate_and_register_up_to_date(ran: Path):
    root = ran
    graft(root, "run", "--no-push")
    assert stale(root) == set()
    dvc(root, "repro", "-f", "--single-item", "train")
    assert stale(root) == set(), dvc(root, "status")


def test_re_evaluating_with_nothing_changed_leaves_register_up_to_date(ran: Path):
    """Run facts (seconds, forward passes) stay out of what register depends on: evaluating the
    same models again writes the same reports, so nothing is registered twice."""
    root = ran
    graft(root, "run", "--no-push")
    assert stale(root) == set()
    dvc(root, "repro", "-f", "--single-item", "evaluate")
    assert "register" not in stale(root), dvc(root, "status", "register")
    assert stale(root) == set(), dvc(root, "status")
