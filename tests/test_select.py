"""select: two tiny candidates ranked and the winner used; a budget skips the expensive one;
train.freeze_layers auto follows the chosen backbone's per-layer scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.errors import GraftError
from graft.files import read_json
from graft.layout import Layout
from tasks.train import TRAINING_STATE

from .conftest import (
    NEWS_CSV,
    build_tiny_bert,
    load_params,
    make_workspace,
    pd_texts,
    run_features,
    run_fetch,
    run_prepare,
    run_select,
    tiny_params,
)


def build_tiny_mpnet(out_dir: Path, texts: list[str], *, layers: int = 3) -> Path:
    """A random MPNet (relative position bias, 3 blocks, hidden 32) with the tiny BERT's
    word-level tokenizer (MPNet's tokenizer is WordPiece too)."""
    import torch
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    build_tiny_bert(out_dir, texts)  # writes the tokenizer (and a BERT we replace)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    cfg = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=70, pad_token_id=tokenizer.pad_token_id,
                      architectures=["MPNetModel"], initializer_range=0.5)
    torch.manual_seed(1)
    (out_dir / "model.safetensors").unlink()
    MPNetModel(cfg).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def two_candidates(tmp_path_factory) -> Path:
    """A workspace ranking a tiny BERT (model.ref) and a tiny MPNet, prepared and selected."""
    base = tmp_path_factory.mktemp("two-candidates")
    texts = pd_texts(NEWS_CSV)
    bert = build_tiny_bert(base / "bert", texts)
    mpnet = build_tiny_mpnet(base / "mpnet", texts)
    # model.ref is the MPNet; the BERT (listed second) scores higher on this data, so the winner
    # is not model.ref and a train that ignored the choice would build an MPNet
    params = tiny_params(mpnet)
    params["model"]["candidates"] = [str(bert)]
    params["train"]["freeze_layers"] = "auto"
    root = make_workspace(base / "ws", params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_prepare(root)
        run_fetch(root)
        run_select(root)
    return root


def test_two_candidates_are_ranked_and_the_winner_is_the_backbone(two_candidates: Path):
    layout = Layout(two_candidates)
    report = read_json(layout.transferability)
    assert set(report["candidates"]) == {"0-mpnet", "1-bert"}
    for name, layers in (("1-bert", 2), ("0-mpnet", 3)):
        scores = report["candidates"][name]["layers"]
        assert set(scores) == {*map(str, range(layers + 1)), "average"}
        for layer in scores.values():
            assert set(layer) == {"logme", "hscore", "knn_val_accuracy"}
            assert all(s["seconds"] >= 0 for s in layer.values())
        assert report["candidates"][name]["forward_seconds"] > 0
    average = {n: c["layers"]["average"]["logme"]["value"] for n, c in report["candidates"].items()}
    winner = max(average, key=average.get)
    assert report["ranked"][0] == report["chosen"] == winner == "1-bert"
    assert report["skipped"] == [{"candidate": min(average, key=average.get), "reason": f"ranked below {winner}"}]
    # THE backbone is the winner's copy: same config and weights
    manifest = read_json(layout.manifest)
    assert manifest["files"] == read_json(layout.candidates_dir / winner / "manifest.json")["files"]
    assert manifest["selection"]["chosen"] == winner
    assert layout.transferability_plot.stat().st_size > 0


def test_a_budget_skips_the_expensive_candidate_and_says_so():
    from tasks.select import choose

    scored = {"big": {"estimated_finetune_seconds": 900.0}, "small": {"estimated_finetune_seconds": 60.0}}
    chosen, skipped = choose(["big", "small"], scored, select="auto", budget=300.0, first="small")
    assert chosen == "small"
    assert skipped == [{"candidate": "big", "reason": "estimated fine-tuning 900s exceeds train.budget_seconds 300s"}]
    assert choose(["big", "small"], scored, select="auto", budget=None, first="small") == (
        "big", [{"candidate": "small", "reason": "ranked below big"}])
    assert choose(["big", "small"], scored, select="ref", budget=None, first="small")[0] == "small"
    with pytest.raises(GraftError, match=r"train.budget_seconds=10: no candidate fits .*big 900s, small 60s"):
        choose(["big", "small"], scored, select="auto", budget=10.0, first="small")


def test_train_uses_the_winner_and_the_auto_freezing_depth(two_candidates: Path):
    from tasks.train import train

    layout = Layout(two_candidates)
    selection = read_json(layout.manifest)["selection"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(two_candidates)
        run_features(two_candidates)
        params = load_params(two_candidates)
        params = params.model_copy(update={"train": params.train.model_copy(update={"strategies": ["partial"],
                                                                                   "epochs": 1})})
        train(params, layout=layout)
    partial = read_json(layout.finetuned_dir / "partial" / "config.json")
    winner_type = read_json(layout.candidates_dir / selection["chosen"] / "config.json")["model_type"]
    assert partial["model_type"] == winner_type == "bert"
    state = read_json(layout.finetuned_dir / "partial" / TRAINING_STATE)
    assert state["freeze_layers"] == selection["freeze_layers_auto"]


@pytest.mark.parametrize("freeze", [1, 2])
def test_mpnet_runs_exactly_from_a_cached_frozen_prefix(tmp_path: Path, freeze: int):
    """MPNet adds a relative position bias that its encoder computes from the sequence (not from
    the blocks): `partial`'s cached-prefix path must give the full forward's logits."""
    import torch

    from graft.modeling import build_classifier, load_tokenizer, tokenize
    from graft.training import _collate_hidden, frozen_outputs, frozen_prefix_removed

    texts = pd_texts(NEWS_CSV)[:6]
    model_dir = build_tiny_mpnet(tmp_path / "mpnet", pd_texts(NEWS_CSV))
    tokenizer = load_tokenizer(model_dir)
    model = build_classifier(model_dir, classes=["a", "b", "c"], from_scratch=False, trust_remote_code=False,
                             name="partial").eval()
    ids = tokenize(tokenizer, texts, 24)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        full = model(**tokenizer.pad({"input_ids": ids}, return_tensors="pt")).logits
        cached = frozen_outputs(model, tokenizer, ids, freeze_layers=freeze, batch_size=4, device=cpu, desc="cache")
        with frozen_prefix_removed(model, freeze):
            resumed = model(**_collate_hidden(cached, cpu)).logits
    assert len({len(i) for i in ids}) > 1  # padding is exercised
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)
