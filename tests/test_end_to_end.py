"""One real run through the real flow: the packaged MiniLM backbone on a small slice of the
packaged BBC News corpus, tracked in a SQLite MLflow store, registered as `challenger`."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import STAGES, pipeline
from graft.files import read_json

from .conftest import REPO, make_workspace

pytestmark = pytest.mark.slow


def test_default_backbone_and_corpus_end_to_end(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["data"]["source"].startswith("package:") and params["model"]["ref"].startswith("package:")
    params["data"].update(train_size=40, val_size=25, test_size=60)
    params["model"]["max_length"] = 64
    params["train"].update(epochs=4, batch_size=8)
    params["train"]["scratch"]["epochs"] = 1
    params["evaluate"]["bootstrap_samples"] = 200
    params["gate"].update(min_accuracy=0.0, min_macro_f1=0.0, required_verdict="any", min_margin=-100.0,
                          max_group_gap=1.0,
                          max_counterfactual_flip_rate=1.0, max_robustness_flip_rate=1.0)
    root = make_workspace(tmp_path / "ws", params)

    with prefect_test_harness(server_startup_timeout=120):
        summary = pipeline(root=str(root))
    assert [r["stage"] for r in summary] == [*STAGES, "push"]

    card = read_json(root / "data/prepared/datacard.json")
    assert card["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert read_json(root / "models/pretrained/manifest.json")["architecture"]["num_hidden_layers"] == 6
    # Real signal from a real backbone: frozen MiniLM features separate BBC topics.
    chosen = read_json(root / "reports/transferability.json")
    assert chosen["candidates"][chosen["chosen"]]["layers"]["6"]["knn_val_accuracy"]["value"] >= 0.7
    metrics = read_json(root / "reports/metrics.json")
    assert metrics["test"]["n"] == 60
    transfer = read_json(root / "reports/transfer.json")
    # Pretrained weights beat the same architecture from random init, even on 40 labels.
    proposed = transfer["candidates"][transfer["proposed"]]["test"]["accuracy"]
    assert transfer["proposed"] in ("linear_probe", "partial")
    assert proposed > transfer["candidates"]["scratch"]["test"]["accuracy"]
    registration = read_json(root / "reports/registration.json")
    assert registration["registered"] and registration["aliases"] == ["challenger"]
    assert registration["tracking_uri"] == f"sqlite:///{root / 'mlruns.db'}"
    assert os.listdir(root.parent / "ws-remote")  # outputs pushed to the local DVC remote
    logged = {a.path for a in mlflow.MlflowClient(tracking_uri=registration["tracking_uri"]).list_artifacts(
        registration["run_id"], "reports")}
    assert {"reports/transferability.json", "reports/sequence_length.json", "reports/adaptation.json",
            "reports/curve.json", "reports/domain.json", "reports/train.json"} <= logged, logged
