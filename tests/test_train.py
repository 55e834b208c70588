"""train: frozen layers stay put, weights are safetensors, training is deterministic, the
TF-IDF baseline round-trips without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from graft.errors import GraftError
from graft.files import read_json
from tasks.fetch import fetch
from tasks.prepare import prepare
from tasks.train import BASELINES_DIR, FINETUNED_DIR, REPORT, load_tfidf, train

from .conftest import load_params


@pytest.fixture
def prepared(workspace: Path) -> Path:
    params = load_params(workspace)
    prepare(params)
    fetch(params)
    return workspace


def test_train_writes_models_and_report(prepared: Path, tiny_model_dir: Path):
    report = train(load_params(prepared))
    assert set(report["candidates"]) == {"finetune", "scratch", "tfidf"}
    for name in ("finetune", "scratch"):
        state = report["candidates"][name]
        assert len(state["history"]) == 2 and 1 <= state["best_epoch"] <= 2
        assert state["best_val_accuracy"] == max(h["val_accuracy"] for h in state["history"])
    assert report["candidates"]["finetune"]["trainable_parameters"] < report["candidates"]["scratch"]["trainable_parameters"]
    for folder in (FINETUNED_DIR, BASELINES_DIR / "scratch"):
        assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
        assert (folder / "training.json").exists() and (folder / "tokenizer_config.json").exists()
    assert read_json(REPORT) == report

    pretrained = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = load_file(str(FINETUNED_DIR / "model.safetensors"))
    frozen = [k for k in pretrained if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [k for k in pretrained if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert frozen and trained
    for key in frozen:
        np.testing.assert_array_equal(pretrained[key], tuned[f"bert.{key}"])
    assert any(not np.array_equal(pretrained[k], tuned[f"bert.{k}"]) for k in trained)


def test_training_is_deterministic(prepared: Path):
    params = load_params(prepared)
    first = train(params)
    weights = load_file(str(FINETUNED_DIR / "model.safetensors"))
    second = train(params)
    for name in ("finetune", "scratch"):
        assert first["candidates"][name]["history"] == second["candidates"][name]["history"]
    again = load_file(str(FINETUNED_DIR / "model.safetensors"))
    for key, value in weights.items():
        np.testing.assert_array_equal(value, again[key])


def test_freezing_more_layers_than_exist_is_named(prepared: Path):
    params = load_params(prepared)
    params = params.model_copy(update={"train": params.train.model_copy(update={"freeze_layers": 5})})
    with pytest.raises(GraftError, match="freeze_layers=5, but the backbone has only 2 layers"):
        train(params)


def test_tfidf_round_trip_matches_sklearn(prepared: Path):
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    params = load_params(prepared)
    train(params)
    frame = pd.read_parquet("data/prepared/train.parquet")
    test = pd.read_parquet("data/prepared/test.parquet")["text"].tolist()
    vec = TfidfVectorizer(ngram_range=(1, params.train.tfidf.ngram_max), sublinear_tf=True)
    clf = LogisticRegression(C=params.train.tfidf.C, max_iter=5000, random_state=params.seed)
    clf.fit(vec.fit_transform(frame["text"]), frame["label_id"])
    expected = clf.predict_proba(vec.transform(test))
    np.testing.assert_allclose(load_tfidf(BASELINES_DIR / "tfidf")(test), expected, atol=1e-6)
