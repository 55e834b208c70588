"""Domain adaptation: the unlabelled source (read, pinned, leak-free), the adapt stage (masked-LM
continued pretraining), self-training chosen on validation, and each method's verdict and gate."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import (
    NEWS_CSV,
    load_params,
    make_workspace,
    run_features,
    run_fetch,
    run_prepare,
    run_select,
    tiny_params,
)


def unlabelled_csv(path: Path, *, test_texts: list[str] = (), rows: int = 40) -> Path:
    """Texts made of the fixture's words (the tiny tokenizer knows them), a label column that
    must be ignored, an empty text, a repeat, and copies of `test_texts` in other case/spacing."""
    words = " ".join(pd.read_csv(NEWS_CSV)["text"]).replace(".", "").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(rows)]
    texts += [texts[0], "", *(f"  {t.upper()} " for t in test_texts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": texts, "label": ["tech"] * len(texts)}).to_csv(path, index=False)
    return path


def adaptation_params(model_dir: Path, unlabelled: Path, methods: list[str]) -> dict:
    params = tiny_params(model_dir)
    params["data"]["unlabelled_source"] = str(unlabelled)
    params["adapt"].update(methods=methods, strategy="partial")
    params["adapt"]["mlm"].update(epochs=2, lr=1e-3, batch_size=8)
    params["adapt"]["self_training"].update(thresholds=[0.5, 0.6], max_rounds=2)
    return params


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny workspace run through evaluate with both adaptation methods (adapt.strategy partial)."""
    from graft.layout import Layout
    from tasks.adapt import adapt
    from tasks.evaluate import evaluate
    from tasks.train import train

    base = tmp_path_factory.mktemp("adapted")
    unlabelled = unlabelled_csv(base / "outside" / "unlabelled.csv")
    root = make_workspace(base / "ws", adaptation_params(tiny_model_dir, unlabelled, ["mlm", "self_training"]))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        params = load_params(root)
        run_prepare(root)
        run_fetch(root)
        run_select(root)
        run_features(root)
        adapt(params, layout=Layout(root))
        train(params)
        evaluate(params)
    return root


def test_unlabelled_text_is_snapshotted_cleaned_and_never_holds_a_val_or_test_text(tmp_path, tiny_model_dir):
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    run_prepare(root)
    test_texts = pd.read_parquet(root / "data/prepared/test.parquet")["text"].tolist()
    val_texts = pd.read_parquet(root / "data/prepared/val.parquet")["text"].tolist()
    source = unlabelled_csv(tmp_path / "outside" / "unlabelled.csv", test_texts=test_texts[:5] + val_texts[:2])
    params = tiny_params(tiny_model_dir)
    params["data"]["unlabelled_source"] = str(source)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    card = run_prepare(root)

    rows = pd.read_parquet(root / "data/prepared/unlabelled.parquet")
    normal = lambda t: " ".join(t.split()).lower()  # noqa: E731
    assert not {normal(t) for t in rows["text"]} & {normal(t) for t in test_texts + val_texts}
    assert list(rows.columns) == ["id", "text"]
    u = card["unlabelled"]
    assert (u["rows_read"], u["dropped_empty"], u["dropped_duplicates"], u["dropped_in_test"], u["dropped_in_val"],
            u["rows"]) == (49, 1, 1, 5, 2, 40)
    assert u["labels_ignored"] is True
    assert (root / "data/raw/unlabelled/unlabelled.csv").read_bytes() == source.read_bytes()
    pinned = yaml.safe_load((root / "data/source.yaml").read_text())
    assert pinned["unlabelled_source"] == str(source.resolve()) and pinned["unlabelled_source_ref"] == str(source)
    assert "Unlabelled text" in (root / "reports/datacard.md").read_text()

    # switched off again: no unlabelled file left behind in the prepared data
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir), sort_keys=False))
    assert "unlabelled" not in run_prepare(root)
    assert not (root / "data/prepared/unlabelled.parquet").exists()
    assert not (root / "data/raw/unlabelled").exists()


def test_an_unlabelled_source_without_the_text_column_is_a_named_error(tmp_path, tiny_model_dir):
    from graft.errors import GraftError

    bad = tmp_path / "unlabelled.csv"
    pd.DataFrame({"body": ["some words here"]}).to_csv(bad, index=False)
    params = tiny_params(tiny_model_dir)
    params["data"]["unlabelled_source"] = str(bad)
    root = make_workspace(tmp_path / "ws", params)
    with pytest.raises(GraftError, match=r"unlabelled\.csv: missing column 'text'"):
        run_prepare(root)


@pytest.mark.slow
def test_a_changed_unlabelled_file_makes_prepare_stale(tmp_path, tiny_model_dir):
    source = unlabelled_csv(tmp_path / "outside" / "unlabelled.csv")
    params = tiny_params(tiny_model_dir)
    params["data"]["unlabelled_source"] = str(source)
    root = make_workspace(tmp_path / "ws", params)
    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
        assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]
        return proc.stdout
    dvc("repro", "--single-item", "prepare")
    assert "prepare" not in json.loads(dvc("status", "prepare", "--json") or "{}")
    with open(source, "a") as handle:
        handle.write("a new kitchen text about bread,food\n")
    assert "prepare" in json.loads(dvc("status", "prepare", "--json") or "{}")


def test_adapt_writes_a_loadable_backbone_with_new_weights_that_train_starts_from(adapted: Path):
    from graft.modeling import load_encoder

    state = json.loads((adapted / "models/adapted/adapt.json").read_text())
    assert state["method"] == "mlm" and state["texts"] == 40 + 18  # unlabelled + train texts
    assert state["head_initialised"], "the tiny BertModel has no masked-LM head: it must be said"
    load_encoder(adapted / "models/adapted")
    pretrained = load_file(str(adapted / "models/pretrained/model.safetensors"))
    tuned = load_file(str(adapted / "models/adapted/model.safetensors"))
    assert tuned.keys() == pretrained.keys()
    moved = [k for k in tuned if not torch.equal(tuned[k], pretrained[k])]
    assert any("encoder.layer" in k for k in moved)
    assert not any(k.startswith("pooler.") for k in moved), "the pooler is the backbone's (MLM has none)"

    candidates = json.loads((adapted / "models/finetuned/candidates.json").read_text())["candidates"]
    assert {"role": "adaptation", "method": "mlm", "reference": "partial"}.items() <= candidates["partial_mlm"].items()
    training = json.loads((adapted / "models/finetuned/partial_mlm/training.json").read_text())
    assert training["init"] == "adapted" and training["adaptation"] == "mlm"
    assert candidates["linear_probe_self_training"]["reference"] == "linear_probe"


def test_each_adaptation_method_gets_a_verdict_an_interval_and_a_gate_check(adapted: Path):
    report = json.loads((adapted / "reports/adaptation.json").read_text())
    assert set(report["methods"]) == {"partial_mlm", "linear_probe_self_training"}
    for m in report["methods"].values():
        assert m["verdict"] in ("positive", "no_gain", "negative")
        assert m["margin_ci"][0] <= m["margin"] <= m["margin_ci"][1]
        assert m["test"]["name"].startswith("exact McNemar")
    gate = json.loads((adapted / "reports/gate.json").read_text())
    names = {c["name"] for c in gate["checks"]}
    assert {"adaptation_verdict:partial_mlm", "adaptation_verdict:linear_probe_self_training"} <= names
    assert 'id="adaptation"' in (adapted / "reports/report.html").read_text()
    transfer = json.loads((adapted / "reports/transfer.json").read_text())
    assert transfer["candidates"]["partial_mlm"]["role"] == "transferred"


def test_adapt_off_writes_only_a_note(tmp_path, tiny_model_dir):
    from graft.layout import Layout
    from tasks.adapt import adapt

    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    result = adapt(load_params(root), layout=Layout(root))
    assert result["method"] is None
    assert [p.name for p in (root / "models/adapted").iterdir()] == ["adapt.json"]


def test_self_training_picks_the_threshold_and_rounds_that_do_best_on_validation():
    from graft.adaptation import self_train_probe

    # two Gaussian classes; the 8 labelled points sit on a skewed slice, the unlabelled ones
    # cover both classes: pseudo-labels move the boundary towards where validation says it is
    rng = np.random.default_rng(0)
    centre = np.array([[-1.0, 0.0], [1.0, 0.0]])
    def draw(n, cls, shift=0.0):
        return centre[cls] + rng.normal(0, 0.6, (n, 2)) + [0, shift]
    train_x = np.concatenate([draw(4, 0, 3.0), draw(4, 1, -3.0)])
    train_y = np.array([0] * 4 + [1] * 4)
    val_x, val_y = np.concatenate([draw(100, 0), draw(100, 1)]), np.array([0] * 100 + [1] * 100)
    unlabelled = np.concatenate([draw(300, 0), draw(300, 1)])
    weight, bias, facts = self_train_probe(train_x, train_y, val_x, val_y, unlabelled, thresholds=[0.6, 0.9],
                                           max_rounds=3, C=0.1, C_grid=[0.1], seed=0)
    grid = facts["grid"]
    assert len(grid) == 1 + 2 * 3 and grid[0]["rounds"] == 0
    best = max(g["val_accuracy"] for g in grid)
    assert facts["chosen"]["val_accuracy"] == best > facts["plain_val_accuracy"]
    assert facts["chosen"]["rounds"] >= 1 and facts["chosen"]["threshold"] in (0.6, 0.9)
    # the weights returned are the chosen ones: they give the reported validation accuracy
    assert ((val_x @ weight.T + bias).argmax(1) == val_y).mean() == pytest.approx(best)


def test_the_adaptation_verdict_is_the_paired_test_against_not_adapting():
    from graft.stats import bootstrap_indices, mcnemar_exact
    from tasks.evaluate import adaptation_verdicts

    y = np.zeros(100, dtype=int)
    reference = np.zeros(100, dtype=int)
    reference[:20] = 1  # 20 wrong
    adapted = np.zeros(100, dtype=int)
    adapted[:2] = 1  # 2 wrong: right on 18 rows where the reference is wrong
    pred = {"partial": reference, "partial_mlm": adapted}
    report = adaptation_verdicts(y, pred, {"partial_mlm": {"method": "mlm", "reference": "partial"}},
                                 bootstrap_indices(100, 500, 0), confidence=0.95, alpha=0.05)
    m = report["methods"]["partial_mlm"]
    assert m["test"] == mcnemar_exact(adapted == y, reference == y)
    assert (m["test"]["only_transferred_right"], m["test"]["only_baseline_right"]) == (18, 0)
    assert m["verdict"] == "positive" and m["margin"] == pytest.approx(0.18)
    assert m["margin_ci"][0] > 0
    # the same predictions the other way round: adapting hurt
    flipped = adaptation_verdicts(y, {"partial": adapted, "partial_mlm": reference},
                                  {"partial_mlm": {"method": "mlm", "reference": "partial"}},
                                  bootstrap_indices(100, 500, 0), confidence=0.95, alpha=0.05)
    assert flipped["methods"]["partial_mlm"]["verdict"] == "negative"


def test_the_gate_requires_the_adaptation_verdict_when_configured(tiny_model_dir, tmp_path):
    from graft import config
    from graft.errors import GraftError
    from tasks.evaluate import gate

    params = tiny_params(tiny_model_dir)
    params["data"]["unlabelled_source"] = str(tmp_path / "u.csv")
    params["adapt"]["methods"] = ["self_training"]
    adaptation = {"methods": {"linear_probe_self_training": {"verdict": "no_gain"}}}
    common = {"metrics": {"accuracy": 1.0, "macro_f1": 1.0}, "verdict": {"verdict": "positive", "margin_points": 5.0},
              "group_gap": None, "counterfactual_flip_rate": None, "robustness_flip_rate": None,
              "adaptation": adaptation}
    for required, passed in (("positive", False), ("no_gain", True), ("any", True)):
        params["gate"]["required_adaptation_verdict"] = required
        result = gate(config.validate(params).gate, **common)
        check = next(c for c in result["checks"] if c["name"] == "adaptation_verdict:linear_probe_self_training")
        assert (check["passed"], result["passed"]) == (passed, passed), required
    # asking for a verdict of nothing, or adapting without unlabelled text, is refused up front
    params["adapt"]["methods"] = []
    params["gate"]["required_adaptation_verdict"] = "positive"
    with pytest.raises(GraftError, match="required_adaptation_verdict='positive' needs adapt.methods"):
        config.validate(params)
    params["gate"]["required_adaptation_verdict"] = "any"
    params["adapt"]["methods"] = ["mlm"]
    params["data"]["unlabelled_source"] = None
    with pytest.raises(GraftError, match="need unlabelled text: set data.unlabelled_source"):
        config.validate(params)


def _masked_batch(tokenizer, seed: int = 0):
    from graft.adaptation import mask_tokens

    words = " ".join(pd.read_csv(NEWS_CSV)["text"]).split()
    texts = [" ".join(words[i:i + 20]) for i in range(0, 160, 20)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    special = torch.tensor([tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                            for r in batch["input_ids"].tolist()], dtype=torch.bool) | (batch["attention_mask"] == 0)
    inputs, labels = mask_tokens(batch["input_ids"], special, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                 probability=0.3, generator=torch.Generator().manual_seed(seed))
    return texts, inputs, batch["attention_mask"], labels


def test_the_masked_positions_only_loss_is_the_models_own_masked_lm_loss(tiny_model_dir):
    from graft.adaptation import load_masked_lm, masked_lm_loss
    from graft.modeling import load_tokenizer

    model, _ = load_masked_lm(tiny_model_dir, trust_remote_code=False)
    model.eval()  # no dropout: both see the same activations
    _, inputs, mask, labels = _masked_batch(load_tokenizer(tiny_model_dir))
    assert (labels != -100).sum() > 5
    with torch.no_grad():
        expected = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        assert float(masked_lm_loss(model, inputs, mask, labels)) == pytest.approx(float(expected), rel=1e-5)


def test_the_head_warm_up_trains_an_initialised_head_alone_and_leaves_the_encoder_as_it_was(tiny_model_dir):
    from graft.adaptation import load_masked_lm, mlm_pretrain
    from graft.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model, initialised = load_masked_lm(tiny_model_dir, trust_remote_code=False)
    assert initialised  # the tiny backbone, like the packaged MiniLM, has no masked-LM head
    encoder = {k: v.clone() for k, v in getattr(model, model.base_model_prefix).state_dict().items()}
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k not in encoder
                   and not k.startswith(model.base_model_prefix + ".")}
    texts, *_ = _masked_batch(tokenizer)
    # the pretraining phase at lr 1e-12 changes nothing measurable: what moved, the warm-up moved
    facts = mlm_pretrain(model, tokenizer, texts * 4, epochs=1, lr=1e-12, batch_size=8, mask_probability=0.3,
                         max_length=64, seed=0, device=torch.device("cpu"), head_warmup_epochs=4, head_warmup_lr=5e-3)
    after = getattr(model, model.base_model_prefix).state_dict()
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in encoder.items())
    assert any(not torch.allclose(model.state_dict()[k], v) for k, v in head_before.items())
    assert len(facts["head_warmup_loss"]) == 4 and facts["head_warmup_loss"][-1] < facts["head_warmup_loss"][0]
    assert all(p.requires_grad for p in model.parameters())  # the encoder is trainable again
