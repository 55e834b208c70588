"""The `setfit` strategy: setfit's body and head folded into graft's classifier give setfit's own
probabilities (through graft's loader and scorer, and through the served model); the train stage
trains it as a candidate whose saved folder scores on validation what train reported; a bad
`train.setfit` value is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from graft import config
from graft.contrastive import fit_body, fold, load_setfit_model
from graft.errors import GraftError
from graft.files import read_json
from graft.layout import Layout
from graft.lengths import resolved_tokenization
from graft.modeling import (
    PROBE_HEAD_FILE,
    load_classifier,
    load_tokenizer,
    proba_scorer,
    save_probe_classifier,
)
from graft.serving import LINEAR_PROBE, TextClassifier, describe, write_description
from tasks.train import train

from .conftest import (
    NEWS_CSV,
    REPO,
    build_tiny_bert,
    load_params,
    pd_texts,
    run_features,
    run_fetch,
    run_prepare,
    run_select,
)

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_bodies(tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT as a plain encoder folder (setfit adds mean pooling) and as a
    sentence-transformers folder ending in Normalize (as all-MiniLM-L6-v2 does). Init 0.5: at
    BERT's 0.02 every text gets nearly the same embedding, and a wrong fold would go unseen."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    base = tmp_path_factory.mktemp("setfit-bodies")
    plain = build_tiny_bert(base / "plain", pd_texts(NEWS_CSV), initializer_range=0.5)
    body = Transformer(str(plain))
    st = SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), "mean"), Normalize()])
    st.save(str(base / "normalized"))
    return {"plain": plain, "normalized": base / "normalized"}


@pytest.mark.parametrize("body, labels", [("plain", None), ("normalized", ["tech", "food"])])
def test_folded_model_gives_setfits_probabilities(tiny_bodies: dict, tmp_path: Path, body: str, labels):
    """All four classes on the plain body; two (sklearn's one-row binary head) on the normalised one."""
    from sklearn.linear_model import LogisticRegression

    frame = pd.read_csv(NEWS_CSV)
    if labels:
        frame = frame[frame["label"].isin(labels)]
    classes = sorted(frame["label"].unique())
    y = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    texts = frame["text"].tolist()
    model = load_setfit_model(tiny_bodies[body], max_length=MAX_LENGTH, truncation="head")
    fit_body(model, texts, y, lr=1e-3, epochs=1, batch_size=8, num_iterations=1, max_length=MAX_LENGTH, seed=0)
    model.model_head = LogisticRegression(C=1.0, max_iter=5000).fit(model.encode(texts), y)
    expected = np.asarray(model.predict_proba(texts, as_numpy=True))

    encoder, weight, bias, normalize = fold(model, len(classes))
    assert normalize is (body == "normalized")
    tokenizer = load_tokenizer(tiny_bodies["plain"])
    folder = tmp_path / "setfit"
    serving = describe(labels=classes, max_length=MAX_LENGTH, truncation="head", tokenizer=tokenizer, head=LINEAR_PROBE,
                       head_file=PROBE_HEAD_FILE, normalize=normalize)
    save_probe_classifier(encoder, tokenizer, weight, bias, classes=classes, out_dir=folder,
                          also_write=lambda d: write_description(d, serving), normalize=normalize)

    scorer = proba_scorer(load_classifier(folder), load_tokenizer(folder), max_length=MAX_LENGTH, batch_size=8,
                          device=torch.device("cpu"))
    graft_proba = scorer(texts)
    served = TextClassifier().load(folder).predict_proba(texts)
    assert expected.shape == graft_proba.shape == (len(texts), len(classes))
    assert np.ptp(expected[:, 0]) > 1e-3  # the texts get different probabilities: the check has teeth
    np.testing.assert_allclose(graft_proba, expected, atol=1e-5)
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_body_from_the_top_level_files_is_the_sentence_transformer(tiny_bodies: dict, tmp_path: Path):
    """models/pretrained holds a folder's top-level files only (fetch drops 1_Pooling/, 2_Normalize/):
    the body built from modules.json embeds as sentence-transformers' load of the whole folder."""
    import shutil

    from sentence_transformers import SentenceTransformer

    for path in tiny_bodies["normalized"].iterdir():
        if path.is_file():
            shutil.copy2(path, tmp_path / path.name)
    body = load_setfit_model(tmp_path, max_length=MAX_LENGTH, truncation="head").model_body
    whole = SentenceTransformer(str(tiny_bodies["normalized"]))
    whole.max_seq_length = MAX_LENGTH
    texts = pd_texts(NEWS_CSV)[:8]
    assert [type(m).__name__ for m in body] == ["Transformer", "Pooling", "Normalize"]
    np.testing.assert_allclose(body.encode(texts), whole.encode(texts), atol=1e-6)


def test_train_stage_trains_setfit_as_a_candidate(workspace: Path):
    run_prepare(workspace)
    run_fetch(workspace)
    run_select(workspace)
    run_features(workspace)
    params = load_params(workspace)
    params = params.model_copy(update={"train": params.train.model_copy(update={
        "strategies": ["linear_probe", "setfit"],
        "setfit": params.train.setfit.model_copy(update={"num_iterations": 1, "lr": 1e-3}),
    })})
    layout = Layout(workspace)
    report = train(params, layout=layout)
    cand = report["candidates"]["setfit"]
    assert cand["role"] == "transfer" and cand["C"] in params.train.setfit.C_grid and cand["seconds"] > 0
    folder = workspace / cand["path"]
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pickle")) == []
    state = read_json(folder / "training.json")
    assert state["strategy"] == "setfit" and state["setfit"]["pairs_per_epoch"] == 2 * 1 * params.data.train_size

    tokens = resolved_tokenization(params, layout)
    val = pd.read_parquet(layout.split_file("val"))
    scorer = proba_scorer(load_classifier(folder), load_tokenizer(folder), max_length=tokens.max_length,
                          truncation=tokens.truncation, batch_size=8, device=torch.device("cpu"))
    proba = scorer(val["text"].tolist())
    assert float((proba.argmax(1) == val["label_id"].to_numpy()).mean()) == cand["best_val_accuracy"]
    np.testing.assert_allclose(np.load(layout.val_predictions)["proba/setfit"], proba, atol=1e-6)
    # serving reads the folder as evaluate does
    np.testing.assert_allclose(TextClassifier().load(folder).predict_proba(val["text"].tolist()), proba, atol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("num_iterations", 0, r"train\.setfit\.num_iterations: Input should be greater than 0"),
    ("C", "big", r"train\.setfit\.C"),
    ("margin", 0.25, r"train\.setfit\.margin: unknown key"),
])
def test_bad_setfit_params_are_named(key: str, value, message: str):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["strategies"] = ["setfit"]
    raw["train"]["setfit"][key] = value
    with pytest.raises(GraftError, match=message):
        config.validate(raw)
