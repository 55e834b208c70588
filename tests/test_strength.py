"""Neither side of the verdict handicapped: the probe's and TF-IDF's C chosen on validation
(planted data sets where a small or a large C wins), and the verdict that survives other seeds
(planted per-seed predictions, and train.seeds: 2 on the tiny workspace)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression

from graft.baselines import fit_tfidf, select_tfidf
from graft.files import read_json
from graft.layout import Layout
from graft.stats import bootstrap_indices, transfer_verdict, verdict_over_seeds
from graft.training import train_linear_probe

from .conftest import (
    NEWS_CSV,
    build_tiny_bert,
    load_params,
    make_workspace,
    pd_texts,
    run_through_evaluate,
    tiny_params,
)

GRID = [0.01, 0.1, 1.0, 10.0, 100.0]


def _imbalanced(rng: np.random.Generator, n: int, *, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """70% class 0. `signal` 0: 60 features of noise, and the best a model can do is say 0 (a
    small C keeps the weights near 0, so the unpenalised intercept decides: class 0; a large C
    fits the noise). Else three features on a tiny scale, the label in the first: only large
    weights (a large C) overcome the intercept."""
    y = (rng.random(n) < 0.3).astype(int)
    if not signal:
        return rng.normal(size=(n, 60)), y
    x = 0.01 * rng.normal(size=(n, 3))
    x[:, 0] += signal * (2 * y - 1)
    return x, y


@pytest.mark.parametrize(("signal", "best"), [(0.0, "small"), (0.02, "large")])
def test_probe_C_on_validation_picks_the_planted_best_and_keeps_that_fit(signal: float, best: str):
    rng = np.random.default_rng(0)
    (tx, ty), (vx, vy) = _imbalanced(rng, 60, signal=signal), _imbalanced(rng, 200, signal=signal)
    weight, bias, facts = train_linear_probe(tx, ty, vx, vy, C="auto", C_grid=GRID, seed=0)
    scores = dict(zip(facts["C_search"]["grid"], facts["C_search"]["val_accuracy"], strict=True))
    assert facts["C"] == min(c for c in GRID if scores[c] == max(scores.values()))  # the best; ties: smaller C
    assert (facts["C"] <= 0.1) if best == "small" else (facts["C"] >= 10.0)
    assert scores[facts["C"]] >= min(scores.values()) + 0.05  # clearly better: 5 points or more
    assert facts["best_val_accuracy"] == max(scores.values())
    direct = LogisticRegression(C=facts["C"], max_iter=5000, random_state=0).fit(tx, ty)
    np.testing.assert_array_equal(weight[1], direct.coef_[0].astype(np.float32))  # binary: rows [0, w]
    np.testing.assert_array_equal(bias[1], np.float32(direct.intercept_[0]))


def test_C_ties_go_to_the_smaller_C_and_a_number_fixes_it():
    rng = np.random.default_rng(1)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 5)) + 5 * y[:, None]  # separable: every C gets every row right
    _, _, facts = train_linear_probe(x, y, x, y, C="auto", C_grid=GRID, seed=0)
    assert facts["C_search"]["val_accuracy"] == [1.0] * len(GRID) and facts["C"] == 0.01
    _, _, fixed = train_linear_probe(x, y, x, y, C=3.0, C_grid=GRID, seed=0)
    assert fixed["C"] == 3.0 and fixed["C_search"] is None


def _texts(rng: np.random.Generator, n: int, *, label_word: bool) -> tuple[list[str], np.ndarray]:
    """Ten random words from a shared pool per text, 70% class 0; `label_word`: class 1 texts
    also carry `signal` once (a weak TF-IDF feature among ten)."""
    pool = [f"w{i}" for i in range(60)]
    y = (rng.random(n) < 0.3).astype(int)
    texts = [" ".join(rng.choice(pool, 10)) + (" signal" if label_word and label else "") for label in y]
    return texts, y


@pytest.mark.parametrize(("label_word", "best"), [(False, "small"), (True, "large")])
def test_tfidf_C_on_validation_picks_the_planted_best_and_is_fit_tfidf_with_it(label_word: bool, best: str):
    rng = np.random.default_rng(2)
    (tt, ty), (vt, vy) = _texts(rng, 80, label_word=label_word), _texts(rng, 200, label_word=label_word)
    pipeline, facts = select_tfidf(tt, ty, vt, vy, ngram_max=1, C="auto", grid=GRID, seed=0)
    scores = dict(zip(facts["C_search"]["grid"], facts["C_search"]["val_accuracy"], strict=True))
    assert (facts["C"] <= 0.1) if best == "small" else (facts["C"] >= 10.0)
    assert scores[facts["C"]] == max(scores.values()) >= min(scores.values()) + 0.05
    direct = fit_tfidf(tt, ty, ngram_max=1, C=facts["C"], seed=0)
    np.testing.assert_array_equal(pipeline.predict_proba(vt), direct.predict_proba(vt))


# -- seeds: the verdict rule on planted predictions ------------------------------------------

def _planted(right_share: dict[int, float], baseline_share: float, n: int = 400):
    """Labels all 0; each seed's predictions right on its share of rows (a seeded random subset),
    the baseline right on the first `baseline_share` of them."""
    y = np.zeros(n, dtype=int)
    rng = np.random.default_rng(3)
    seeds = {s: np.where(rng.random(n) < share, 0, 1) for s, share in right_share.items()}
    baseline = np.where(np.arange(n) < baseline_share * n, 0, 1)
    return y, seeds, {"scratch": baseline, "tfidf": 1 - y}


def _verdict(y, seeds, baselines, base_seed=0):
    resamples = bootstrap_indices(len(y), 500, 0)
    return verdict_over_seeds(y, seeds, baselines, resamples, base_seed=base_seed, confidence=0.95, alpha=0.05)


def test_every_seed_significantly_better_is_positive_and_spread_is_reported():
    y, seeds, baselines = _planted({0: 0.9, 1: 0.88, 2: 0.91}, baseline_share=0.6)
    v = _verdict(y, seeds, baselines)
    assert v["verdict"] == v["base_seed_verdict"] == "positive" and not v["negative_transfer"]
    s = v["seeds"]
    accuracy = [s["per_seed"][k]["accuracy"] for k in ("0", "1", "2")]
    assert s["seeds"] == [0, 1, 2] and s["n"] == 3
    assert (s["accuracy_mean"], s["accuracy_min"], s["accuracy_max"]) == (np.mean(accuracy), min(accuracy), max(accuracy))
    assert s["accuracy_sd"] == pytest.approx(np.std(accuracy, ddof=1))
    assert all(r["significant"] and r["verdict"] == "positive" for r in s["per_seed"].values())
    assert s["margin_ci"][0] > 0


def test_mixed_seeds_are_no_gain_though_the_base_seed_alone_is_positive():
    # the base seed wins clearly; another seed is no better than the baseline
    y, seeds, baselines = _planted({0: 0.9, 1: 0.6}, baseline_share=0.6)
    v = _verdict(y, seeds, baselines)
    assert v["base_seed_verdict"] == "positive" and v["seeds"]["per_seed"]["1"]["verdict"] == "no_gain"
    assert v["verdict"] == "no_gain" and v["seeds"]["margin_ci"][0] <= 0


def test_every_seed_significantly_worse_is_negative():
    y, seeds, baselines = _planted({0: 0.4, 1: 0.42}, baseline_share=0.7)
    v = _verdict(y, seeds, baselines)
    assert v["verdict"] == "negative" and v["negative_transfer"] and v["seeds"]["margin_ci"][1] < 0


@pytest.mark.parametrize("share", [0.9, 0.6, 0.62, 0.3])
def test_one_seed_leaves_the_paired_test_verdict_unchanged(share: float):
    y, seeds, baselines = _planted({0: share}, baseline_share=0.6)
    resamples = bootstrap_indices(len(y), 500, 0)
    one = verdict_over_seeds(y, seeds, baselines, resamples, base_seed=0, confidence=0.95, alpha=0.05)
    plain = transfer_verdict(y, seeds[0], baselines, resamples, confidence=0.95, alpha=0.05)
    assert {k: one[k] for k in plain} == plain
    assert one["seeds"]["margin_ci"] == plain["margin_ci"] and one["seeds"]["accuracy_sd"] is None


# -- seeds and C through the stages on the tiny workspace ------------------------------------

@pytest.fixture(scope="session")
def two_seeds_evaluated(tmp_path_factory) -> Path:
    """The tiny workspace with `partial` alone (so it is the proposed strategy) and train.seeds: 2."""
    base = tmp_path_factory.mktemp("two-seeds")
    params = tiny_params(build_tiny_bert(base / "tiny-bert", pd_texts(NEWS_CSV), initializer_range=0.5))
    params["train"].update(strategies=["partial"], seeds=2)
    return run_through_evaluate(make_workspace(base / "ws", params))


def test_two_seeds_give_two_models_and_evaluate_reports_their_spread(two_seeds_evaluated: Path):
    layout = Layout(two_seeds_evaluated)
    manifest = read_json(layout.candidates)
    assert manifest["proposed"] == "partial" and manifest["candidates"]["partial"]["path"] == "models/finetuned/partial"
    assert list(manifest["seeds"]["models"]) == ["1"]
    assert manifest["seeds"]["models"]["1"]["path"] == "models/finetuned/seeds/seed-1"
    assert read_json(layout.seed_model_dir(1) / "training.json")["seed"] == 1
    assert read_json(layout.finetuned_dir / "partial" / "training.json")["seed"] == 0
    assert (layout.seed_model_dir(1) / "model.safetensors").read_bytes() != (
        layout.finetuned_dir / "partial" / "model.safetensors").read_bytes()
    transfer = read_json(layout.transfer)
    seeds = transfer["seeds"]
    assert seeds["seeds"] == [0, 1] and set(seeds["per_seed"]) == {"0", "1"}
    assert seeds["per_seed"]["0"]["accuracy"] == transfer["candidates"]["partial"]["test"]["accuracy"]
    assert {"accuracy_mean", "accuracy_sd", "accuracy_min", "accuracy_max", "margin_ci", "rule"} <= set(seeds)
    assert transfer["base_seed_verdict"] in ("positive", "no_gain", "negative")
    # what register checks the served model against stays the base seed's
    assert read_json(layout.test_predictions)["candidate"] == "partial"
    assert "partial over 2 seeds" in layout.report_html.read_text()
    assert "seeds" in read_json(layout.train_report)


def test_saved_baselines_and_probe_record_the_C_chosen_on_validation(two_seeds_evaluated: Path, tmp_path: Path):
    from graft.lengths import resolved_tokenization
    from tasks.train import train_probe

    root = two_seeds_evaluated
    layout, params = Layout(root), load_params(root)
    tfidf = read_json(layout.baselines_dir / "tfidf" / "training.json")
    assert tfidf["C"] in params.train.tfidf.C_grid and tfidf["C_search"]["grid"] == params.train.tfidf.C_grid
    assert read_json(layout.train_report)["candidates"]["tfidf"]["C"] == tfidf["C"]
    # the probe: the saved head is a direct fit with the C its training.json names
    import pandas as pd

    labels = {s: pd.read_parquet(layout.split_file(s))["label_id"].to_numpy() for s in ("train", "val")}
    data = {"train_labels": labels["train"], "val_labels": labels["val"]}
    state = train_probe(params, classes=read_json(layout.datacard)["classes"], data=data, layout=layout,
                        tokens=resolved_tokenization(params, layout), out_dir=tmp_path / "probe")
    assert read_json(tmp_path / "probe" / "training.json")["C"] == state["C"] in params.train.probe.C_grid
    direct = LogisticRegression(C=state["C"], max_iter=5000, random_state=params.seed).fit(
        np.load(layout.features_file("train")), labels["train"])
    head = load_file(str(tmp_path / "probe" / "probe_head.safetensors"))
    np.testing.assert_array_equal(head["weight"], direct.coef_.astype(np.float32))
    # the frozen-backbone probe in evaluate picks its C by the same rule on the same features
    backbone = read_json(layout.transfer)["candidates"]["backbone_probe"]
    assert backbone["C"] == state["C"] and backbone["C_search"] == state["C_search"]
