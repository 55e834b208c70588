"""register: an MLflow run with params, metrics, data digest and reports; a version with the
alias `challenger` only when the gate passed."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.files import read_json, write_json
from tasks.evaluate import evaluate
from tasks.fetch import fetch
from tasks.prepare import prepare
from tasks.register import register
from tasks.train import train

from .conftest import load_params, make_workspace, tiny_params


@pytest.fixture(scope="module")
def evaluated_root(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """prepare → evaluate once for this module (the stages write relative to the cwd)."""
    root = make_workspace(tmp_path_factory.mktemp("register") / "ws", tiny_params(tiny_model_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        params = load_params(root)
        prepare(params)
        fetch(params)
        train(params)
        evaluate(params)
    return root


@pytest.fixture
def evaluated(evaluated_root: Path, monkeypatch) -> Path:
    monkeypatch.chdir(evaluated_root)
    return evaluated_root


def test_registers_a_version_with_the_challenger_alias(evaluated: Path, tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register(load_params(evaluated), uri=uri)
    assert result["registered"] and result["version"] == "1" and result["aliases"] == ["challenger"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("graft-classifier", "challenger")
    assert str(version.version) == "1" and version.run_id == result["run_id"]
    run = client.get_run(result["run_id"])
    assert run.data.params["train.lr"] == str(load_params(evaluated).train.lr)
    assert "test_accuracy" in run.data.metrics and "transfer_margin" in run.data.metrics
    assert run.data.tags["dataset_fingerprint"] == read_json(Path("data/prepared/datacard.json"))["fingerprint"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "val", "test"}
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "reports")}
    assert {"reports/metrics.json", "reports/transfer.json", "reports/gate.json"} <= artifacts


def test_failed_gate_logs_the_run_but_registers_nothing(evaluated: Path, tmp_path: Path):
    from mlflow import MlflowClient

    original = read_json(Path("reports/gate.json"))
    failing = {"passed": False, "checks": [{**original["checks"][0], "passed": False}, *original["checks"][1:]]}
    write_json(Path("reports/gate.json"), failing)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        result = register(load_params(evaluated), uri=uri)
    finally:
        write_json(Path("reports/gate.json"), original)
    assert result["registered"] is False and "min_accuracy" in result["reason"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(result["run_id"]).data.tags["gate_passed"] == "False"
    assert client.search_registered_models() == []
