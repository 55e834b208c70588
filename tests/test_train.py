"""train: every strategy trains; frozen layers stay put and their cached outputs are exact; the
linear probe runs no backbone pass; model folders are stable; the TF-IDF baseline round-trips
through skops with scikit-learn's own probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from graft.baselines import load_tfidf
from graft.errors import GraftError
from graft.files import read_json
from graft.layout import Layout
from graft.lengths import resolved_tokenization
from graft.modeling import load_classifier, load_tokenizer, predict_proba
from tasks.train import train

from .conftest import NEWS_CSV, load_params, run_features, run_fetch, run_prepare, run_select


@pytest.fixture
def prepared(workspace: Path) -> Path:
    run_prepare(workspace)
    run_fetch(workspace)
    run_select(workspace)
    run_features(workspace)
    return workspace


def with_train(params, **update):
    return params.model_copy(update={"train": params.train.model_copy(update=update)})


def test_every_strategy_trains_and_loads(prepared: Path, tiny_model_dir: Path):
    layout = Layout(prepared)
    params = with_train(load_params(prepared), strategies=["linear_probe", "partial", "full", "lora"])
    report = train(params, layout=layout)
    assert set(report["candidates"]) == {"linear_probe", "partial", "full", "lora", "scratch", "tfidf"}
    assert report["proposed"] in params.train.strategies
    best = max(report["candidates"][s]["best_val_accuracy"] for s in params.train.strategies)
    assert report["candidates"][report["proposed"]]["best_val_accuracy"] == best
    assert read_json(layout.train_report) == report

    val = pd.read_parquet(layout.split_file("val"))
    saved = np.load(layout.val_predictions)
    assert saved["ids"].tolist() == val["id"].astype(str).tolist()
    assert {f"proba/{n}" for n in ("partial", "full", "lora", "scratch")} <= set(saved.files)
    for name, cand in report["candidates"].items():
        folder = prepared / cand["path"]
        assert folder.is_dir(), name
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
        state = read_json(folder / "training.json")
        # run facts (seconds, throughput) live in reports/train.json, never in a model folder
        assert "seconds" not in state and "throughput" not in state
        if cand["kind"] == "tfidf":
            continue
        assert (folder / "tokenizer_config.json").exists()
        model = load_classifier(folder)
        proba = predict_proba(model, load_tokenizer(folder), val["text"].tolist(), max_length=32, batch_size=8,
                              device=torch.device("cpu"))
        accuracy = float((proba.argmax(1) == val["label_id"].to_numpy()).mean())
        assert accuracy == pytest.approx(cand["best_val_accuracy"], abs=1e-9), name
        if f"proba/{name}" in saved.files:  # the best epoch's val probabilities are the saved model's
            np.testing.assert_allclose(saved[f"proba/{name}"], proba, atol=1e-5, err_msg=name)
    # LoRA is merged: a plain model folder, no adapter files, no peft needed to load it
    assert not list((layout.finetuned_dir / "lora").glob("adapter_*"))
    for name in ("partial", "full", "lora", "scratch"):
        throughput = report["candidates"][name]["throughput"]
        assert throughput and all(t["samples_per_s"] > 0 and t["tokens_per_s"] > 0 for t in throughput)


def test_partial_keeps_frozen_weights_bit_identical(prepared: Path, tiny_model_dir: Path):
    layout = Layout(prepared)
    train(with_train(load_params(prepared), strategies=["partial"]), layout=layout)
    pretrained = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = load_file(str(layout.finetuned_dir / "partial" / "model.safetensors"))
    frozen = [k for k in pretrained if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [k for k in pretrained if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert frozen and trained
    for key in frozen:
        np.testing.assert_array_equal(pretrained[key], tuned[f"bert.{key}"])
    assert any(not np.array_equal(pretrained[k], tuned[f"bert.{k}"]) for k in trained)


def test_bf16_training_steps_change_weights_in_fp32_and_leave_frozen_ones_alone(prepared: Path, tiny_model_dir: Path):
    layout = Layout(prepared)
    train(with_train(load_params(prepared), strategies=["partial"], patience=None, precision="fp32"), layout=layout)
    fp32_weights = load_file(str(layout.finetuned_dir / "partial" / "model.safetensors"))
    train(with_train(load_params(prepared), strategies=["partial"], patience=None, precision="bf16"), layout=layout)
    bf16_weights = load_file(str(layout.finetuned_dir / "partial" / "model.safetensors"))
    pretrained = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(v.dtype == np.float32 for v in bf16_weights.values())  # autocast, not a bf16 model
    for key in (k for k in pretrained if k.startswith(("embeddings.", "encoder.layer.0."))):
        np.testing.assert_array_equal(pretrained[key], bf16_weights[f"bert.{key}"])
    trained = [k for k in fp32_weights if k.startswith("bert.encoder.layer.1.") and k.endswith("weight")]
    # the same run in another precision: close, but not the same numbers
    assert any(not np.array_equal(fp32_weights[k], bf16_weights[k]) for k in trained)


def test_cached_frozen_outputs_match_recomputing_them(prepared: Path):
    layout = Layout(prepared)
    params = with_train(load_params(prepared), strategies=["partial"], patience=None)
    cached = train(params, layout=layout)["candidates"]["partial"]
    cached_weights = load_file(str(layout.finetuned_dir / "partial" / "model.safetensors"))
    recomputed = train(with_train(params, cache_frozen=False), layout=layout)["candidates"]["partial"]
    again = load_file(str(layout.finetuned_dir / "partial" / "model.safetensors"))
    assert cached["frozen_cached"] and not recomputed["frozen_cached"]
    history = read_json(layout.finetuned_dir / "partial" / "training.json")["history"]
    assert len(history) == 2
    for key, value in cached_weights.items():
        np.testing.assert_allclose(value, again[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_linear_probe_runs_no_backbone_forward(prepared: Path, monkeypatch):
    from transformers.models.bert import modeling_bert

    def refuse(*args, **kwargs):
        raise AssertionError("the linear probe must not run the backbone")

    monkeypatch.setattr(modeling_bert.BertModel, "forward", refuse)
    layout = Layout(prepared)
    params = with_train(load_params(prepared), strategies=["linear_probe"])
    from tasks import train as train_stage

    monkeypatch.setattr(train_stage, "train_transformer", lambda *a, **k: pytest.fail("only the probe should train"))
    state = train_stage.train_probe(params, classes=read_json(layout.datacard)["classes"],
                                    data={"train_labels": pd.read_parquet(layout.split_file("train"))["label_id"].to_numpy(),
                                          "val_labels": pd.read_parquet(layout.split_file("val"))["label_id"].to_numpy()},
                                    layout=layout, tokens=resolved_tokenization(params, layout),
                                    out_dir=layout.finetuned_dir / "linear_probe")
    assert 0 <= state["best_val_accuracy"] <= 1
    assert (layout.finetuned_dir / "linear_probe" / "probe_head.safetensors").exists()


def test_model_folders_are_byte_identical_across_runs(prepared: Path):
    layout = Layout(prepared)
    params = with_train(load_params(prepared), strategies=["linear_probe", "partial"])
    train(params, layout=layout)
    first = {p.relative_to(prepared): p.read_bytes() for p in (prepared / "models").rglob("*")
             if p.is_file() and "pretrained" not in p.parts}
    train(params, layout=layout)
    second = {p.relative_to(prepared): p.read_bytes() for p in (prepared / "models").rglob("*")
              if p.is_file() and "pretrained" not in p.parts}
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    # a finished run leaves no resume state behind
    assert not list((prepared / "models" / "checkpoints").glob("*/state.json"))


def test_freezing_more_layers_than_exist_is_named(prepared: Path):
    params = with_train(load_params(prepared), strategies=["partial"], freeze_layers=5)
    with pytest.raises(GraftError, match="freeze_layers=5, but the backbone has only 2 layers"):
        train(params, layout=Layout(prepared))


def test_unknown_strategy_is_named(prepared: Path):
    import yaml

    from graft import config

    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["train"]["strategies"] = ["partial", "distill"]
    with pytest.raises(GraftError, match=r"train\.strategies: .*distill"):
        config.validate(params)


def test_tfidf_round_trip_matches_sklearn(prepared: Path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    layout = Layout(prepared)
    params = with_train(load_params(prepared), strategies=["linear_probe"])
    train(params, layout=layout)
    frame = pd.read_parquet(layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))["text"].tolist()
    vec = TfidfVectorizer(ngram_range=(1, params.train.tfidf.ngram_max), sublinear_tf=True)
    # train.tfidf.C is auto: the C chosen on validation is the one the saved baseline records
    chosen = read_json(layout.baselines_dir / "tfidf" / "training.json")["C"]
    assert chosen in params.train.tfidf.C_grid
    clf = LogisticRegression(C=chosen, max_iter=5000, random_state=params.seed)
    clf.fit(vec.fit_transform(frame["text"]), frame["label_id"])
    expected = clf.predict_proba(vec.transform(test))
    np.testing.assert_allclose(load_tfidf(layout.baselines_dir / "tfidf")(test), expected, atol=1e-12)


def test_binary_tfidf_probabilities_are_sklearns(tmp_path: Path):
    from graft.baselines import fit_tfidf, save_tfidf

    texts, labels = ["rain and wind", "wind and storm", "sun and heat", "heat and sun again"], np.array([0, 0, 1, 1])
    pipeline = fit_tfidf(texts, labels, ngram_max=1, C=10.0, seed=0)
    save_tfidf(pipeline, tmp_path / "tfidf", {"classes": ["wet", "dry"]})
    loaded = load_tfidf(tmp_path / "tfidf")(["storm and heat"])
    scores = pipeline.decision_function(["storm and heat"])
    np.testing.assert_allclose(loaded[:, 1], 1 / (1 + np.exp(-scores)), atol=1e-12)  # sigmoid(s), not sigmoid(2s)


def test_a_new_head_is_said_in_one_line_and_only_unexpected_keys_are_reported(tmp_path: Path, tiny_model_dir: Path,
                                                                              capfd):
    """transformers' LOAD REPORT table reads like an error; the new head is expected, and what is
    not (a backbone weight missing, a checkpoint weight unused) is still named."""
    from transformers import BertConfig, BertForMaskedLM

    from graft.modeling import build_classifier

    build_classifier(tiny_model_dir, classes=["food", "sport", "tech"], name="partial")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
    assert "[transformers]" not in err  # nor any other transformers warning the silencing might switch on
    assert out.splitlines() == ["partial: new classification head for 3 classes"]

    # a masked-LM checkpoint: no pooler (missing from the backbone), an LM head (unused)
    mlm_dir = tmp_path / "mlm"
    BertForMaskedLM(BertConfig.from_pretrained(tiny_model_dir)).save_pretrained(mlm_dir, safe_serialization=True)
    build_classifier(mlm_dir, classes=["a", "b"], name="full")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err
    lines = out.splitlines()
    assert lines[0] == "full: new classification head for 2 classes"
    assert any(line.startswith("full: warning: 2 backbone weight(s) not in the checkpoint, newly initialised: "
                               "bert.pooler.dense.bias") for line in lines), lines
    assert any(line.startswith("full: warning: ") and "checkpoint weight(s) not used by the model: cls.predictions"
               in line for line in lines), lines


def test_fit_steps_with_fused_adamw_on_the_cpu(tmp_path: Path, tiny_model_dir: Path):
    """The optimizer a fit runs (read back from its checkpoint) is AdamW's fused kernel on the
    CPU, as on a GPU; its first step moves the weights as the per-tensor loop does."""
    from graft.modeling import build_classifier, seed_everything
    from graft.training import FitSettings, fit, prepare_strategy

    frame = pd.read_csv(Path(__file__).parent / "fixtures" / "news_tiny.csv")
    classes = sorted(frame["label"].unique())
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    seed_everything(0)
    model, frozen, groups = prepare_strategy(build_classifier(tiny_model_dir, classes=classes), "partial",
                                             freeze_layers=1, lr=5e-3, weight_decay=0.01)
    fit(model, load_tokenizer(tiny_model_dir), train_texts=frame["text"][:12].tolist(), train_labels=labels[:12],
        val_texts=frame["text"][12:18].tolist(), val_labels=labels[12:18],
        settings=FitSettings(lr=5e-3, epochs=1, batch_size=4, max_length=32, checkpoint_every=1, eval_batch_size=8),
        param_groups=groups, device=torch.device("cpu"), freeze_layers=frozen, checkpoint_dir=tmp_path / "ckpt",
        fingerprint="fused", desc="fused")
    [state] = [torch.load(p, weights_only=True) for p in (tmp_path / "ckpt").rglob("optimizer.pt")]
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    weights = [torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    moved = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
        for p, w in zip(params, weights, strict=True):
            p.grad = torch.sin(w.detach())
        torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01, fused=fused).step()
        moved[fused] = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(moved[True], moved[False], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native", [True, False])
def test_auto_training_steps_are_bf16_on_a_gpu_and_on_a_cpu_with_native_bf16(native: bool, monkeypatch):
    from graft import modeling

    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert modeling.step_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert modeling.step_precision("auto", cuda) == "bf16"
    assert modeling.step_precision("fp32", cpu) == "fp32" and modeling.step_precision("bf16", cpu) == "bf16"
    with modeling.autocast(cpu, modeling.step_precision("auto", cpu)):
        assert torch.is_autocast_enabled("cpu") is native
    with modeling.autocast(cpu):  # the frozen-output cache and validation: fp32 on any CPU
        assert not torch.is_autocast_enabled("cpu")


def test_the_tfidf_vocabulary_is_saved_beside_the_skops_file_and_read_back(tmp_path: Path):
    """skops stores a dict node per term (seconds for a bigram vocabulary); the vocabulary goes
    to vocabulary.json, the skops file holds the rest, and loading gives sklearn's probabilities.
    A missing or mismatched vocabulary file is named; a skops file that still holds its own
    vocabulary (written before) loads as it did."""
    import json
    import zipfile

    import skops.io as sio

    from graft.baselines import TFIDF_FILE, VOCABULARY_FILE, fit_tfidf, save_tfidf

    frame = pd.read_csv(NEWS_CSV)
    texts, labels = frame["text"].tolist(), frame["label"].astype("category").cat.codes.to_numpy()
    pipeline = fit_tfidf(texts[:40], labels[:40], ngram_max=2, C=10.0, seed=0)
    vocabulary = dict(pipeline.named_steps["tfidf"].vocabulary_)
    out = tmp_path / "tfidf"
    save_tfidf(pipeline, out, {"classes": ["a"]})
    assert pipeline.named_steps["tfidf"].vocabulary_ == vocabulary  # the caller's pipeline is whole
    terms = json.loads((out / VOCABULARY_FILE).read_text(encoding="utf-8"))
    assert {t: i for i, t in enumerate(terms)} == vocabulary
    with zipfile.ZipFile(out / TFIDF_FILE) as archive:
        schema = archive.read("schema.json").decode()
    assert '"vocabulary_"' not in schema and len(schema) < 20_000  # (fixed_vocabulary_ stays)
    np.testing.assert_allclose(load_tfidf(out)(texts[40:]), pipeline.predict_proba(texts[40:]), atol=1e-12)

    (out / VOCABULARY_FILE).write_text(json.dumps(terms[:-1]), encoding="utf-8")
    with pytest.raises(GraftError, match=rf"{VOCABULARY_FILE}: {len(terms) - 1} terms, but the vectorizer has"):
        load_tfidf(out)
    (out / VOCABULARY_FILE).unlink()
    with pytest.raises(GraftError, match=rf"{VOCABULARY_FILE}: missing"):
        load_tfidf(out)
    old = tmp_path / "old"  # the format before: one skops file, vocabulary inside
    old.mkdir()
    pipeline.named_steps["tfidf"].__dict__.pop("_stop_words_id", None)
    (old / TFIDF_FILE).write_bytes(sio.dumps(pipeline))
    np.testing.assert_allclose(load_tfidf(old)(texts[40:]), pipeline.predict_proba(texts[40:]), atol=1e-12)


def test_validation_runs_in_the_precision_evaluate_scores_in(tiny_model_dir: Path):
    """Two fits alike but for the inference mode the recipe names: the same steps (fp32, same
    seed) reach the same weights, and each fit's validation probabilities, which evaluate reuses,
    are that mode's: predict_proba in bf16 for bf16 (and bf16_compiled), fp32 for fp32 and int8."""
    from graft.modeling import build_classifier, seed_everything
    from graft.training import FitSettings, fit, prepare_strategy, validation_precision

    assert [validation_precision(m) for m in ("fp32", "bf16", "int8", "bf16_compiled")] == ["fp32", "bf16", "fp32",
                                                                                            "bf16"]
    frame = pd.read_csv(NEWS_CSV)
    classes = sorted(frame["label"].unique())
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    tokenizer = load_tokenizer(tiny_model_dir)
    val_texts = frame["text"][12:30].tolist()
    fitted = {}
    for mode in ("fp32", "bf16"):
        seed_everything(0)
        model, frozen, groups = prepare_strategy(build_classifier(tiny_model_dir, classes=classes), "full",
                                                 freeze_layers=0, lr=5e-3, weight_decay=0.01)
        result = fit(model, tokenizer, train_texts=frame["text"][:12].tolist(), train_labels=labels[:12],
                     val_texts=val_texts, val_labels=labels[12:30], param_groups=groups, device=torch.device("cpu"),
                     settings=FitSettings(lr=5e-3, epochs=1, batch_size=4, max_length=32, eval_batch_size=8,
                                          precision="fp32", inference=mode), freeze_layers=frozen, desc=mode)
        fitted[mode] = (model, result["val_proba"])
    for (a, b) in zip(fitted["fp32"][0].parameters(), fitted["bf16"][0].parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the steps did not depend on the mode
    for mode, (model, val_proba) in fitted.items():
        rescored = predict_proba(model, tokenizer, val_texts, max_length=32, batch_size=8, device=torch.device("cpu"),
                                 inference=mode)
        np.testing.assert_allclose(val_proba, rescored, atol=1e-6)
    assert np.abs(fitted["fp32"][1] - fitted["bf16"][1]).max() > 1e-5  # bf16 validation is not fp32's (fp32 noise: 1e-7)
