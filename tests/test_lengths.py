"""Sequence length from the data (`model.max_length: auto`) and head / tail / head_tail truncation:
the rule on planted length distributions, the cut on planted token sequences, and a tiny
workspace whose planted train texts decide the length that train, evaluate and the served model
use, with the served model giving evaluate's predictions under head_tail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from graft import config, registry
from graft.errors import GraftError
from graft.files import read_json, write_json
from graft.layout import Layout
from graft.lengths import choose_max_length, position_cap, resolve_max_length, resolved_tokenization
from graft.serving import SERVING_FILE, TextClassifier
from graft.truncation import TRUNCATIONS, keep_window, tokenize

from .conftest import (
    REPO,
    build_tiny_bert,
    load_params,
    make_workspace,
    run_through_evaluate,
    tiny_params,
)

CLS, SEP = 101, 102


def planted(*groups: tuple[int, int]) -> np.ndarray:
    """Token lengths: `count` texts of `length` tokens for each (count, length)."""
    return np.concatenate([np.full(count, length) for count, length in groups])


# ---------------------------------------------------------------- the rule of `auto`


def test_auto_is_the_smallest_multiple_of_8_that_covers_the_share_asked_for():
    lengths = np.arange(1, 101)  # 1..100 tokens, one text each
    choice, facts = choose_max_length(lengths, coverage=0.9, budget=4096, cap=512)
    assert facts["rule"]["covering_length"] == 90 and choice == 96 and facts["rule"]["decided_by"] == "coverage"
    assert (lengths <= choice).mean() >= 0.9 and (lengths <= choice - 8).mean() < 0.9  # covers, and minimal
    assert facts["truncated_share"] == 0.04 and facts["quantiles"]["p50"] == 50 and facts["quantiles"]["max"] == 100
    # 90% of texts are 10 tokens: coverage 0.9 ignores the long tenth, 0.95 does not
    skewed = planted((90, 10), (10, 300))
    assert choose_max_length(skewed, coverage=0.9, budget=4096, cap=512)[0] == 16
    assert choose_max_length(skewed, coverage=0.95, budget=4096, cap=512)[0] == 304
    assert choose_max_length(planted((10, 129)), coverage=1.0, budget=4096, cap=512)[0] == 136  # rounded up
    assert choose_max_length(planted((10, 3)), coverage=1.0, budget=4096, cap=512)[0] == 8


def test_auto_never_exceeds_the_backbones_positions():
    long = planted((5, 100), (95, 2000))
    choice, facts = choose_max_length(long, coverage=0.9, budget=4096, cap=512)
    assert choice == 512 and facts["rule"]["decided_by"] == "cap" and facts["truncated_share"] == 0.95
    assert choose_max_length(long, coverage=0.9, budget=4096, cap=100)[0] == 100  # a cap off the multiples of 8
    assert position_cap(514, 512) == 512  # RoBERTa: 514 positions, 512 tokens
    assert position_cap(512, int(1e30)) == 512  # a tokenizer that states no limit
    with pytest.raises(GraftError, match="model.max_length: 600 tokens, but the backbone takes at most 512"):
        resolve_max_length(600, long, coverage=0.9, budget=4096, cap=512)


def test_auto_stays_within_the_budget_of_mean_tokens_per_text():
    # half the texts are 50 tokens, half 1000: mean tokens after truncation at L is 25 + L / 2
    lengths = planted((50, 50), (50, 1000))
    choice, facts = choose_max_length(lengths, coverage=1.0, budget=200, cap=4096)
    assert choice == 344 and facts["rule"]["decided_by"] == "budget"
    assert facts["mean_tokens"] == 197.0 <= 200 < np.minimum(lengths, choice + 8).mean()
    # the cost is stated against 128: 25 + 64 = 89 tokens per text there
    assert facts["reference"] == {"max_length": 128, "truncated_share": 0.5, "mean_tokens": 89.0}
    assert facts["relative_cost"] == round(197 / 89, 3)
    assert choose_max_length(lengths, coverage=1.0, budget=8, cap=4096)[0] == 8  # never below 8
    with pytest.raises(GraftError, match="no train texts"):
        choose_max_length(np.zeros(0, dtype=int), coverage=0.9, budget=256, cap=512)


def test_a_fixed_length_is_kept_and_its_report_says_what_auto_would_pick():
    length, facts = resolve_max_length(128, planted((90, 10), (10, 300)), coverage=0.9, budget=256, cap=512)
    assert length == 128 and facts["requested"] == 128 and facts["truncated_share"] == 0.1
    assert facts["auto"]["max_length"] == 16 and facts["auto"]["decided_by"] == "coverage"


def test_max_length_must_be_a_number_of_tokens_or_auto():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for bad in ("bogus", True, 4, 5000, "128"):
        raw["model"]["max_length"] = bad
        with pytest.raises(GraftError, match=r"model\.max_length: Value error, expected a number of tokens from 8 "
                                             r"to 4096, or auto"):
            config.validate(raw, "params.yaml")
    raw["model"]["max_length"] = "auto"
    raw["model"]["truncation"] = "middle"
    with pytest.raises(GraftError, match=r"1 invalid parameter\(s\):\n  model\.truncation: "):
        config.validate(raw, "params.yaml")
    raw["model"]["truncation"] = "head_tail"
    assert config.validate(raw).model.max_length == "auto"
    # the names params accept are the names graft.truncation cuts by
    assert typing.get_args(config.ModelParams.model_fields["truncation"].annotation) == TRUNCATIONS


# ---------------------------------------------------------------- head, tail, head_tail


def test_head_tail_keeps_the_first_quarter_and_the_last_three_quarters_of_the_window():
    ids = [CLS, *range(1, 101), SEP]
    mask = [1, *[0] * 100, 1]
    # 18 tokens: 16 of text beside [CLS] and [SEP], 4 from the head and 12 from the tail
    assert keep_window(ids, mask, max_length=18, truncation="head_tail") == [CLS, 1, 2, 3, 4, *range(89, 101), SEP]
    assert keep_window(ids, mask, max_length=18, truncation="tail") == [CLS, *range(85, 101), SEP]
    assert keep_window(ids, mask, max_length=18, truncation="head") == [CLS, *range(1, 17), SEP]
    # Sun et al.'s 512: 127 head + 383 tail tokens
    cut = keep_window([CLS, *range(1, 2001), SEP], [1, *[0] * 2000, 1], max_length=512, truncation="head_tail")
    assert cut[:129] == [CLS, *range(1, 128), 1618] and cut[-1] == SEP and len(cut) == 512
    assert keep_window(ids[:10], mask[:9] + [1], max_length=18, truncation="head_tail") == ids[:10]  # fits: unchanged


def test_every_truncation_cuts_real_tokenizer_output_between_its_special_tokens(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = "bread recipe bake kitchen flavour soup cheese sauce fruit network chip robot computer device phone".split()
    text = " ".join(words * 3)  # 45 words, one token each
    whole = tokenizer(text)["input_ids"]
    assert len(whole) == 47 and whole[0] == tokenizer.cls_token_id and whole[-1] == tokenizer.sep_token_id
    (head,), (tail,), (both,) = (tokenize(tokenizer, [text], max_length=14, truncation=t) for t in TRUNCATIONS)
    assert head == tokenizer([text], truncation=True, max_length=14)["input_ids"][0]  # head: as graft always did
    assert tail == [whole[0], *whole[-13:-1], whole[-1]]
    assert both == [whole[0], *whole[1:4], *whole[-10:-1], whole[-1]]
    assert tokenize(tokenizer, ["bread soup"], max_length=14, truncation="head_tail") == [tokenizer("bread soup")["input_ids"]]


# ---------------------------------------------------------------- auto in a workspace, served as evaluated

SHORT, LONG = 12, 40  # words (tokens) of the planted train texts
WORDS = {"food": "bread recipe bake kitchen flavour soup cheese sauce fruit".split(),
         "tech": "network chip robot computer device phone internet cloud data".split(),
         "sport": "match goal team player coach league score win season".split()}


def planted_csv(path: Path) -> Path:
    """Train: 15 texts of 12 words and 3 of 40 (coverage 0.9 -> the 40-word ones count: 42 tokens
    -> max_length 48). Val and test: texts of 30 to 100 words, most of them cut at 48, where head
    and head_tail see different words (each text's class words sit at its end)."""
    rng = np.random.default_rng(0)
    filler = "the a of in for was said today very and".split()
    rows = []
    for split, lengths in (("train", [SHORT] * 15 + [LONG] * 3), ("val", [30, 60, 90, 100] * 3),
                           ("test", [35, 55, 70, 80, 95, 100] * 3)):
        for i, n in enumerate(lengths):
            label = list(WORDS)[i % 3]
            tail = min(n, 6 if split == "train" else max(6, n // 3))
            body = [*rng.choice(filler, n - tail), *rng.choice(WORDS[label], tail)]
            rows.append({"id": f"{split}-{i}", "text": " ".join(body), "label": label, "split": split})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def auto_head_tail(tmp_path_factory) -> Path:
    """A tiny workspace with `max_length: auto` and `truncation: head_tail`, through evaluate."""
    base = tmp_path_factory.mktemp("auto-head-tail")
    csv = planted_csv(base / "planted.csv")
    # at BERT's init (0.02) every text gets nearly the same output, and a wrong cut would go unseen
    model_dir = build_tiny_bert(base / "tiny-bert", pd.read_csv(csv)["text"].tolist(), initializer_range=0.5)
    params = tiny_params(model_dir, data_source=csv)
    params["data"]["split_column"] = "split"
    params["data"]["group_columns"] = []
    params["model"].update(max_length="auto", length_coverage=0.9, length_budget=256, truncation="head_tail")
    params["train"]["strategies"] = ["linear_probe", "partial"]
    params["register"]["promotion"]["verdicts"] = ["positive", "no_gain", "negative"]
    return run_through_evaluate(make_workspace(base / "ws", params))


def test_auto_resolves_the_length_from_the_train_texts_and_every_stage_uses_it(auto_head_tail: Path):
    layout = Layout(auto_head_tail)
    assert read_json(layout.recipe) == {"max_length": 48, "truncation": "head_tail", "requested": "auto",
                                       "inference": "fp32", "inference_requested": "fp32"}
    facts = read_json(layout.sequence_length)
    assert facts["max_length"] == 48 and facts["requested"] == "auto" and facts["texts"] == 18
    assert facts["rule"] == {"coverage": 0.9, "budget_mean_tokens": 256, "cap": 64, "covering_length": LONG + 2,
                             "decided_by": "coverage"}
    assert facts["quantiles"]["p50"] == SHORT + 2 and facts["truncated_share"] == 0.0
    assert layout.token_lengths_plot.read_bytes()[:4] == b"\x89PNG"
    assert resolved_tokenization(load_params(auto_head_tail), layout).max_length == 48
    for strategy in ("linear_probe", "partial"):
        served = read_json(layout.finetuned_dir / strategy / SERVING_FILE)
        assert served["max_length"] == 48 and served["truncation"]["keep"] == "head_tail", strategy
    assert read_json(layout.train_report)["max_length"] == 48
    page = layout.report_html.read_text()
    section = page[page.index('id="sequence_length"'):page.index('id="examples"')]
    assert "max_length <b>48</b> (chosen by <code>max_length: auto</code>)" in section and "head_tail" in section


def test_train_and_evaluate_refuse_a_features_output_made_for_other_params(auto_head_tail: Path):
    params = load_params(auto_head_tail)
    other = params.model_copy(update={"model": params.model.model_copy(update={"truncation": "head"})})
    with pytest.raises(GraftError, match=r"recipe.json: features ran with max_length 'auto', truncation 'head_tail', "
                                         r"but params say 'auto', 'head'; run the 'features' stage again"):
        resolved_tokenization(other, Layout(auto_head_tail))


def test_the_registered_model_serves_head_tail_as_evaluated_even_without_graft(auto_head_tail: Path, tmp_path: Path,
                                                                                monkeypatch):
    import mlflow

    from tasks.evaluate import evaluate
    from tasks.register import register

    root = tmp_path / "ws"
    shutil.copytree(auto_head_tail, root, symlinks=True)
    layout, uri = Layout(root), f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(root)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, uri)
    params = load_params(root)
    test = pd.read_parquet(layout.split_file("test"))
    texts = test["text"].tolist()
    # the linear probe is proposed: features, evaluate's backbone scorer and serving must all cut alike
    write_json(layout.candidates, {**read_json(layout.candidates), "proposed": "linear_probe"})
    evaluate(params)
    expected = read_json(layout.test_predictions)
    result = register(params, layout, uri=uri)
    assert result["parity"]["passed"] and result["parity"]["rows"] == len(texts)
    mlflow.set_tracking_uri(None)

    # the test can fail: served with the head instead, the same folder gives other predictions
    folder = layout.finetuned_dir / "linear_probe"
    write_json(folder / SERVING_FILE, {**read_json(folder / SERVING_FILE), "truncation": {
        **read_json(folder / SERVING_FILE)["truncation"], "keep": "head"}})
    assert not registry.parity(expected, TextClassifier().load(folder).predict(None, pd.DataFrame({"text": texts})))["passed"]

    # served where graft cannot be imported: serving.py finds graft/truncation.py logged beside it
    script = ("import sys, json; sys.modules['graft'] = None\n"
              "import mlflow, pandas as pd\n"
              f"m = mlflow.pyfunc.load_model('models:/graft-classifier/{result['version']}')\n"
              f"out = m.predict(pd.DataFrame({{'text': json.loads(sys.argv[1])}}))\n"
              "print(json.dumps(out.to_dict(orient='list')))\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.DataFrame(json.loads(done.stdout.strip().splitlines()[-1]))
    check = registry.parity(expected, served)
    assert check["passed"], check
