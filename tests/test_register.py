"""register: an MLflow run with params, metrics, data digest and reports; a version with the
alias `challenger` when the gate passed, promoted to `champion` only when it beats the champion
on this run's test split; a pyfunc model that loads and predicts without any network."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from graft.files import read_json, write_json
from graft.layout import Layout
from graft.lengths import resolved_tokenization
from graft.serving import SERVING_FILE
from tasks.evaluate import predictions_of, transformer_predictor
from tasks.register import register

from .conftest import load_params, make_workspace, run_through_evaluate, tiny_params

NAME = "graft-classifier"
LINEAGE_TAGS = {"git_commit", "git_dirty", "dvc_lock_sha256", "data_fingerprint", "backbone_source",
                "backbone_sha256", "prefect_flow_run_id"}


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch) -> Iterator[None]:
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, which every later subprocess
    (a DVC stage in another test) would inherit: put the environment back after each test."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)  # MLflow keeps the URI globally and re-exports it otherwise


@pytest.fixture(scope="module")
def evaluated_root(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """prepare → evaluate once for this module (the stages write relative to the cwd)."""
    params = tiny_params(tiny_model_dir)
    # the tiny model loses to TF-IDF; promotion tests are about the comparison, not the verdict
    params["register"]["promotion"]["verdicts"] = ["positive", "no_gain", "negative"]
    root = make_workspace(tmp_path_factory.mktemp("register") / "ws", params)
    return run_through_evaluate(root)


@pytest.fixture
def evaluated(evaluated_root: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the evaluated workspace (tests edit reports and splits)."""
    root = tmp_path / "ws"
    shutil.copytree(evaluated_root, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any connection other than loopback or a local socket fails at once, and is recorded."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # would MLflow go to the hub, it would try here
    return attempts


def constant_classifier(src: Path, dst: Path, label: str) -> Path:
    """A copy of the fine-tuned model that always predicts `label` (head weights zero, bias on)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src, use_safetensors=True)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-5.0)
        model.classifier.bias[model.config.label2id[label]] = 5.0
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    shutil.copy2(src / SERVING_FILE, dst / SERVING_FILE)
    return dst


def propose(root: Path, model_dir: Path) -> None:
    """What the train stage writes: the proposed candidate and its folder (candidates manifest);
    and what evaluate writes for it: its test predictions."""
    import torch

    write_json(root / "models/finetuned/candidates.json",
               {"proposed": "candidate", "candidates": {"candidate": {"kind": "transformer", "path": str(model_dir),
                                                                      "role": "transfer"}}})
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    params = load_params(root)
    tokens = resolved_tokenization(params, Layout(root))
    proba = transformer_predictor(model_dir, params, tokens, torch.device("cpu"), "candidate")(test["text"].tolist())
    classes = read_json(root / "data/prepared/datacard.json")["classes"]
    write_json(Layout(root).test_predictions, predictions_of("candidate", proba, test, classes))


def aliases(client) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def test_first_passing_version_is_champion_with_lineage_and_loads_offline(evaluated: Path, tmp_path: Path, no_network):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.perf_counter()
    result = register(load_params(evaluated), Layout(evaluated), uri=uri)
    seconds = time.perf_counter() - started
    assert no_network == []  # nothing reached for a hub (or anything else off this machine)
    assert seconds < 40, f"register took {seconds:.1f}s"
    assert result["registered"] and result["version"] == "1" and result["aliases"] == ["challenger", "champion"]
    assert result["promotion"]["reason"] == "first version to pass the gate"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert aliases(client) == {"challenger": "1", "champion": "1"}
    version = client.get_model_version(NAME, "1")
    assert LINEAGE_TAGS <= set(version.tags)
    assert version.tags["data_fingerprint"] == read_json(Path("data/prepared/datacard.json"))["fingerprint"]
    assert version.tags["dvc_lock_sha256"] == "none"  # the stages ran outside DVC here
    assert version.tags["backbone_source"].startswith("local:")
    assert "## Limitations" in version.description and "## Gate" in version.description
    run = client.get_run(result["run_id"])
    assert run.data.params["train.lr"] == str(load_params(evaluated).train.lr)
    assert run.data.params["register.promotion.min_gain"] == "0.0"
    assert {"test_accuracy", "transfer_margin", "registry_test_accuracy"} <= set(run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "val", "test"}
    assert {"reports/metrics.json", "reports/transfer.json", "reports/gate.json"} <= {
        a.path for a in client.list_artifacts(result["run_id"], "reports")}

    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{NAME}@champion"
    texts = ["Bread recipe bake kitchen flavour.", "Cloud data robot internet computer."]
    predicted = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": texts}))
    classes = read_json(Path("data/prepared/datacard.json"))["classes"]
    assert list(predicted.columns) == ["label", "probability", *[f"probability_{c}" for c in classes]]
    assert len(predicted) == 2 and set(predicted["label"]) <= set(classes)
    assert predicted[[f"probability_{c}" for c in classes]].sum(axis=1).round(4).tolist() == [1.0, 1.0]
    info = mlflow.models.get_model_info(model_uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text"]
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    requirements = (local / "requirements.txt").read_text().split()
    assert all("==" in line for line in requirements if not line.startswith("-")), requirements
    assert {"torch", "transformers", "mlflow"} <= {line.split("==")[0] for line in requirements}
    assert (local / "input_example.json").exists()
    assert "Limitations" in next(local.rglob("model_card.md")).read_text()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.bin"))  # nothing to unpickle


def test_promotion_needs_a_win_on_this_runs_test_split_and_a_failed_gate_moves_nothing(evaluated: Path, tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    params = load_params(evaluated)
    classes = read_json(Path("data/prepared/datacard.json"))["classes"]
    winner, loser = classes[0], classes[1]
    test = pd.read_parquet("data/prepared/test.parquet")
    # a frozen test split where `winner` is right 2/3 of the time and `loser` 1/3
    test["label"] = [winner if i % 3 else loser for i in range(len(test))]
    test.to_parquet("data/prepared/test.parquet", index=False)
    models = {label: constant_classifier(Path("models/finetuned/partial"), tmp_path / label, label) for label in classes[:2]}

    propose(evaluated, models[loser])
    first = register(params, Layout(evaluated), uri=uri)
    assert first["aliases"] == ["challenger", "champion"]

    propose(evaluated, models[winner])
    better = register(params, Layout(evaluated), uri=uri)
    assert better["aliases"] == ["challenger", "champion"] and better["version"] == "2"
    assert better["promotion"]["champion_version"] == "1"
    assert better["promotion"]["champion_test_accuracy"] == pytest.approx(1 / 3, abs=0.01)
    assert better["promotion"]["test_accuracy"] == pytest.approx(2 / 3, abs=0.01)

    propose(evaluated, models[loser])
    worse = register(params, Layout(evaluated), uri=uri)
    assert worse["version"] == "3" and worse["aliases"] == ["challenger"]
    assert "is not > 0.0" in worse["promotion"]["reason"]
    assert aliases(client) == {"challenger": "3", "champion": "2"}

    # the same model again does not beat itself: a tie never promotes
    propose(evaluated, models[winner])
    tie = register(params, Layout(evaluated), uri=uri)
    assert tie["aliases"] == ["challenger"] and aliases(client)["champion"] == "2"

    gate = read_json(Path("reports/gate.json"))
    write_json(Path("reports/gate.json"), {"passed": False, "checks": [
        {"name": "min_accuracy", "value": 0.1, "threshold": 0.8, "passed": False}, *gate["checks"][1:]]})
    failed = register(params, Layout(evaluated), uri=uri)
    assert failed["registered"] is False and failed["reason"] == "gate failed: min_accuracy = 0.1 (threshold 0.8)"
    assert aliases(client) == {"challenger": "4", "champion": "2"}
    assert len(client.search_model_versions(f"name='{NAME}'")) == 4
    assert client.get_run(failed["run_id"]).data.tags["gate_failed_checks"] == "min_accuracy"


def test_verdict_rule_keeps_a_negative_transfer_out_of_champion(evaluated: Path, tmp_path: Path):
    from mlflow import MlflowClient

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["register"]["promotion"]["verdicts"] = ["positive"]
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    transfer = read_json(Path("reports/transfer.json"))
    write_json(Path("reports/transfer.json"), {**transfer, "verdict": "negative"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register(load_params(evaluated), Layout(evaluated), uri=uri)
    assert result["aliases"] == ["challenger"]
    assert result["promotion"]["reason"] == "transfer verdict 'negative' is not one of ['positive']"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert aliases(client) == {"challenger": "1"}  # no champion at all rather than a negative transfer
