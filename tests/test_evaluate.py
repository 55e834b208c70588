"""evaluate: the negative-transfer verdict, the gate, and the report contracts of DESIGN.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graft import config
from graft.files import read_json
from tasks.evaluate import PLOTS, bootstrap_indices, evaluate, gate, transfer_verdict
from tasks.fetch import fetch
from tasks.prepare import prepare
from tasks.train import train

from .conftest import load_params

TRUTH = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 4)


def _predictions(wrong: int) -> np.ndarray:
    pred = TRUTH.copy()
    pred[:wrong] = (pred[:wrong] + 1) % 3
    return pred


@pytest.mark.parametrize(("proposed_wrong", "baseline_wrong", "negative"), [(2, 8, False), (8, 2, True), (5, 5, True)])
def test_negative_transfer_when_the_transferred_model_does_not_beat_the_best_baseline(
    proposed_wrong: int, baseline_wrong: int, negative: bool
):
    resamples = bootstrap_indices(len(TRUTH), 200, 0)
    verdict = transfer_verdict(
        TRUTH, _predictions(proposed_wrong),
        {"tfidf": _predictions(baseline_wrong), "scratch": _predictions(20)}, resamples, 0.95,
    )
    assert verdict["best_baseline"] == "tfidf"
    assert verdict["negative_transfer"] is negative
    assert verdict["margin"] == pytest.approx((baseline_wrong - proposed_wrong) / len(TRUTH))
    low, high = verdict["margin_ci"]
    assert low <= verdict["margin"] <= high
    assert 0.0 <= verdict["test"]["p_value"] <= 1.0


def test_gate_checks_each_threshold():
    params = config.GateParams(min_accuracy=0.9, min_macro_f1=0.5, require_positive_transfer=True)
    result = gate(params, {"accuracy": 0.85, "macro_f1": 0.8}, {"margin": 0.02, "negative_transfer": False})
    assert result["passed"] is False
    assert [(c["name"], c["passed"]) for c in result["checks"]] == [
        ("min_accuracy", False), ("min_macro_f1", True), ("positive_transfer", True)]
    assert set(result["checks"][0]) == {"name", "value", "threshold", "passed"}


def test_reports_follow_the_design_contract(workspace: Path):
    params = load_params(workspace)
    prepare(params)
    fetch(params)
    train(params)
    evaluate(params)
    metrics = read_json(Path("reports/metrics.json"))
    assert {"accuracy", "macro_f1"} <= set(metrics["test"]) and {"accuracy", "macro_f1"} <= set(metrics["val"])
    transfer = read_json(Path("reports/transfer.json"))
    assert set(transfer["candidates"]) == {"finetune", "scratch", "tfidf"}
    for cand in transfer["candidates"].values():
        low, high = cand["test"]["accuracy_ci"]
        assert low <= cand["test"]["accuracy"] <= high
    assert isinstance(transfer["negative_transfer"], bool)
    assert transfer["margin"] == pytest.approx(
        transfer["candidates"]["finetune"]["test"]["accuracy"]
        - transfer["candidates"][transfer["best_baseline"]]["test"]["accuracy"])
    assert transfer["test"]["name"].startswith("exact McNemar")
    gate_report = read_json(Path("reports/gate.json"))
    assert set(gate_report) == {"passed", "checks"}
    assert (PLOTS / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
