"""evaluate: statistics on planted cases, bias and robustness probes on planted models, the gate,
and the reports of a real run (DESIGN.md contracts, DVC metrics/plots, the HTML report in Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score

from graft import config
from graft.bias import (
    IdentityAxis,
    cooccurrence,
    counterfactual_pairs,
    counterfactual_probe,
    group_metrics,
    load_identity_terms,
    load_template_probes,
    swap_terms,
    template_probe,
)
from graft.errors import GraftError
from graft.files import read_json
from graft.layout import Layout
from graft.report import SECTIONS, gate_failure_message, render_html, summary_markdown
from graft.robustness import perturb, robustness_probe
from graft.stats import bootstrap_indices, bootstrap_scores, transfer_verdict, with_intervals
from tasks.evaluate import _summary_lines, assess, gate

from .conftest import NEWS_CSV, make_workspace, pin_sources, tiny_params

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- statistics


def test_vectorised_bootstrap_equals_sklearn_on_every_resample():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 120), rng.integers(0, 4, 120)
    p[:60] = y[:60]
    resamples = bootstrap_indices(len(y), 40, seed=3)
    boot = bootstrap_scores(y, p, resamples, n_classes=4)
    for k, idx in enumerate(resamples):
        assert boot["accuracy"][k] == pytest.approx(accuracy_score(y[idx], p[idx]))
        assert boot["macro_f1"][k] == pytest.approx(f1_score(y[idx], p[idx], average="macro", zero_division=0))


def _planted(n: int, accuracy: float, rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    pred = y.copy()
    wrong = rng.choice(n, size=round(n * (1 - accuracy)), replace=False)
    pred[wrong] = (y[wrong] + 1) % 3
    return pred


@pytest.mark.parametrize(("proposed_acc", "baseline_acc", "expected"),
                         [(0.8, 0.8, "no_gain"), (0.92, 0.72, "positive"), (0.70, 0.90, "negative")])
def test_verdict_on_planted_cases(proposed_acc: float, baseline_acc: float, expected: str):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    baseline = _planted(400, baseline_acc, rng, y)
    proposed = baseline.copy() if proposed_acc == baseline_acc else _planted(400, proposed_acc, rng, y)
    verdict = transfer_verdict(y, proposed, {"tfidf": baseline, "scratch": _planted(400, 0.5, rng, y)},
                               bootstrap_indices(400, 500, 0), confidence=0.95, alpha=0.05)
    assert verdict["best_baseline"] == "tfidf"
    assert verdict["verdict"] == expected
    assert verdict["negative_transfer"] is (expected == "negative")
    assert verdict["margin_points"] == pytest.approx(100 * (proposed_acc - baseline_acc))
    low, high = verdict["margin_ci"]
    assert low <= verdict["margin"] <= high
    assert (verdict["test"]["p_value"] < 0.05) is (expected != "no_gain")


def test_accuracy_intervals_cover_the_true_accuracy_at_about_the_nominal_rate():
    """300 simulated classifiers whose rows are right with probability 0.8: the 95% percentile
    interval from 200 test rows should hold 0.8 about 95% of the time."""
    rng = np.random.default_rng(42)
    n, true_accuracy, trials, covered = 200, 0.8, 300, 0
    y = np.zeros(n, dtype=int)
    for t in range(trials):
        pred = np.where(rng.random(n) < true_accuracy, 0, 1)
        low, high = with_intervals(y, pred, bootstrap_indices(n, 500, t), 0.95, 2)["accuracy_ci"]
        covered += low <= true_accuracy <= high
    rate = covered / trials
    print(f"coverage of 95% accuracy intervals: {rate:.3f}")  # noqa: T201 (figure for the closing note)
    assert 0.90 <= rate <= 0.985


def _gate_params(**overrides) -> config.GateParams:
    base = dict(min_accuracy=0.5, min_macro_f1=0.5, max_group_gap=0.1, max_counterfactual_flip_rate=0.1,
                max_robustness_flip_rate=0.1)
    committed = yaml.safe_load((REPO / "params.yaml").read_text())["gate"]
    return config.GateParams(**{**committed, **base, **overrides})


def _verdict(name: str, points: float) -> dict:
    return {"verdict": name, "margin_points": points}


@pytest.mark.parametrize(("required", "verdict", "passed"), [
    ("positive", "positive", True), ("positive", "no_gain", False), ("no_gain", "no_gain", True),
    ("no_gain", "negative", False), ("any", "negative", True)])
def test_gate_requires_the_configured_verdict(required: str, verdict: str, passed: bool):
    result = gate(_gate_params(required_verdict=required, min_margin=-100), metrics={"accuracy": 0.9, "macro_f1": 0.9},
                  verdict=_verdict(verdict, 1.0), group_gap=None, counterfactual_flip_rate=0.0,
                  robustness_flip_rate=0.0)
    assert result["passed"] is passed
    assert next(c for c in result["checks"] if c["name"] == "verdict")["passed"] is passed


def test_gate_checks_each_threshold_and_names_the_failures():
    result = gate(_gate_params(min_margin=2.0, min_accuracy=0.9), metrics={"accuracy": 0.85, "macro_f1": 0.8},
                  verdict=_verdict("positive", 1.5), group_gap=0.2, counterfactual_flip_rate=0.05,
                  robustness_flip_rate=0.3)
    status = {c["name"]: c["passed"] for c in result["checks"]}
    assert status == {"verdict": True, "min_margin": False, "min_accuracy": False, "min_macro_f1": True,
                      "max_group_gap": False, "max_counterfactual_flip_rate": True, "max_robustness_flip_rate": False}
    assert all(set(c) == {"name", "value", "threshold", "passed"} for c in result["checks"])
    message = gate_failure_message(result)
    assert all(name in message for name, ok in status.items() if not ok)
    assert "max_counterfactual_flip_rate" not in message


# ---------------------------------------------------------------- bias on planted models

TOPICS = {"sport": ["match", "goal", "team", "coach"], "food": ["bread", "soup", "recipe", "kitchen"]}
CLASSES = ["food", "sport"]


def _synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = CLASSES[i % 2]
        subject = ("He", "his") if (i // 2) % 2 else ("She", "her")
        words = rng.choice(TOPICS[label], size=2)
        rows.append({"text": f"{subject[0]} said {subject[1]} {words[0]} and the {words[1]} were fine.",
                     "label": label, "label_id": CLASSES.index(label), "group": "a" if i % 3 else "b"})
    return pd.DataFrame(rows)


def keyword_model(biased: bool = False, noise: float = 0.0):
    """Predicts the topic from keywords; `biased` sends every text that mentions a woman to food."""
    rng = np.random.default_rng(7)
    flip = {}

    def predict(texts):
        out = np.zeros((len(texts), 2))
        for i, text in enumerate(texts):
            low = text.lower()
            sport = sum(w in low for w in TOPICS["sport"]) > sum(w in low for w in TOPICS["food"])
            if biased and re.search(r"\b(she|her)\b", low):
                sport = False
            if noise:
                sport ^= flip.setdefault(text, bool(rng.random() < noise))
            out[i, int(sport)] = 0.9
            out[i, 1 - int(sport)] = 0.1
        return out

    return predict


def _tiny_config(gate_overrides: dict | None = None) -> config.Params:
    params = tiny_params(Path("unused"))
    params["evaluate"].update(bootstrap_samples=200, max_probe_texts=100)
    params["gate"].update(required_verdict="any", max_robustness_flip_rate=1.0, max_group_gap=1.0,
                          **(gate_overrides or {}))
    return config.validate(params)


@pytest.mark.parametrize("biased", [False, True])
def test_a_model_keyed_on_a_gendered_word_is_caught_and_fails_the_gate(biased: bool, tmp_path: Path):
    params = _tiny_config({"max_counterfactual_flip_rate": 0.10, "min_margin": -100.0})
    train, val, test = _synthetic(60, 0), _synthetic(40, 1), _synthetic(120, 2)
    predictors = {"finetune": keyword_model(biased), "scratch": keyword_model(noise=0.3),
                  "tfidf": keyword_model(noise=0.1), "backbone_probe": keyword_model(noise=0.2)}
    result = assess(predictors, params=params, layout=Layout(REPO), train=train, val=val, test=test,
                    classes=CLASSES, group_columns=["group"])
    gender = result["bias"]["counterfactual"]["finetune"]["axes"]["gender"]
    checks = {c["name"]: c for c in result["gate"]["checks"]}
    print(f"planted {'biased' if biased else 'unbiased'} model: gender flip rate {gender['flip_rate']:.3f}, "  # noqa: T201
          f"mean TV {gender['mean_tv']:.3f}")
    directions = {d["direction"]: d for d in result["bias"]["counterfactual"]["finetune"]["directions"]
                  if d["axis"] == "gender"}
    if biased:
        assert gender["severity"] == "major" and gender["flip_rate"] >= 0.10
        # only texts about sport that mention a man flip, and only when he becomes she
        assert directions["male->female"]["flip_rate"] == pytest.approx(0.5, abs=0.1)
        assert directions["female->male"]["flip_rate"] == pytest.approx(0.5, abs=0.1)
        assert directions["male->female"]["examples"]
        # the direction survives: making the subject a woman moves probability from sport to food
        assert directions["male->female"]["mean_shift"]["food"] > 0.3 > -0.3 > directions["male->female"]["mean_shift"]["sport"]
        assert directions["female->male"]["mean_shift"]["food"] < -0.3
        assert not checks["max_counterfactual_flip_rate"]["passed"] and not result["gate"]["passed"]
        assert [c["name"] for c in result["gate"]["checks"] if not c["passed"]] == ["max_counterfactual_flip_rate"]
    else:
        assert gender["flip_rate"] == 0.0 and gender["severity"] == "ok"
        assert result["gate"]["passed"], result["gate"]
    assert set(result["bias"]["counterfactual"]) == set(predictors) - {"scratch"}  # evaluate.probe_scratch: false
    assert set(result["bias"]["groups"]["group"]) == set(predictors)
    assert result["bias"]["cooccurrence"]["gender"]["female"]["texts"] == int(train["text"].str.contains("She").sum())
    assert set(result["robustness"]["candidates"]["finetune"]["perturbations"]) == {
        "typo", "casing", "punctuation", "whitespace"}
    markdown = summary_markdown(result["transfer"], result["gate"], result["bias"], result["robustness"])
    assert ("failed" in markdown) is biased


@pytest.mark.parametrize("probe_scratch", [False, True])
def test_the_scratch_baseline_is_scored_for_the_verdict_and_probed_only_when_asked(probe_scratch: bool):
    """Off by default: scratch scores the test and validation texts (the verdict needs them) and
    nothing else; on, it gets every probe the other candidates get."""
    params = _tiny_config()
    params = config.validate({**params.model_dump(), "evaluate": {**params.evaluate.model_dump(),
                                                                   "probe_scratch": probe_scratch}})
    train, val, test = _synthetic(60, 0), _synthetic(40, 1), _synthetic(120, 2)
    seen: list[str] = []
    scratch = keyword_model(noise=0.3)

    def counted(texts):
        seen.extend(texts)
        return scratch(texts)

    predictors = {"finetune": keyword_model(biased=True), "scratch": counted,
                  "tfidf": keyword_model(noise=0.1), "backbone_probe": keyword_model(noise=0.2)}
    result = assess(predictors, params=params, layout=Layout(REPO), train=train, val=val, test=test,
                    classes=CLASSES, group_columns=["group"])
    probed = {"finetune", "tfidf", "backbone_probe"} | ({"scratch"} if probe_scratch else set())
    assert set(result["bias"]["counterfactual"]) == probed
    assert set(result["robustness"]["candidates"]) == probed
    assert set(result["bias"]["templates"]["candidates"]) == probed
    assert "scratch" in result["transfer"]["candidates"] and "scratch" in result["bias"]["groups"]["group"]
    scored = set(test["text"]) | set(val["text"])
    if probe_scratch:
        assert len(set(seen) - scored) > 0
    else:
        assert sorted(seen) == sorted(test["text"].tolist() + val["text"].tolist())
    [line] = [line for line in _summary_lines(result) if line.startswith("evaluate: scratch")]
    assert ("counterfactual flips —" in line) is not probe_scratch, line


class _Outline(HTMLParser):
    """Section ids in page order, and whether every example list sits inside a <details>."""

    def __init__(self):
        super().__init__()
        self.sections, self.open_details, self.loose_examples, self.collapsed_examples = [], 0, 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "details":
            self.open_details += 1
        elif tag == "ul" and attrs.get("class") == "examples":
            self.collapsed_examples += bool(self.open_details)
            self.loose_examples += not self.open_details

    def handle_endtag(self, tag):
        self.open_details -= tag == "details"


def test_report_answers_first_escapes_text_once_and_collapses_examples():
    """Source texts carry HTML entities (BBC: `&#163;1.8m`) and may carry markup: the page shows
    the pound sign, shows markup as text (also markup hidden in entities), and puts the summary
    first and the examples last, collapsed."""
    params = _tiny_config({"min_margin": 50.0})
    payload = " Fined &#163;1.8m (or £2m) <script>alert(1)</script> &lt;img src=x onerror=alert(2)&gt;"
    test = _synthetic(60, 2).assign(text=lambda f: f["text"] + payload)
    predictors = {"finetune": keyword_model(biased=True), "scratch": keyword_model(noise=0.3),
                  "tfidf": keyword_model(noise=0.1), "backbone_probe": keyword_model(noise=0.2)}
    result = assess(predictors, params=params, layout=Layout(REPO), train=_synthetic(40, 0), val=_synthetic(20, 1),
                    test=test, classes=CLASSES, group_columns=["group"])
    page = render_html(transfer=result["transfer"], gate=result["gate"], bias=result["bias"],
                       robustness=result["robustness"], datacard={"source": "planted &#163; <b>"}, plots={})
    assert "Fined £1.8m (or £2m)" in page and "&amp;#163;" not in page and "&#163;" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "<img src=x" not in page
    outline = _Outline()
    outline.feed(page)
    assert outline.sections == list(SECTIONS)
    assert outline.sections[:2] == ["summary", "candidates"] and outline.sections[-1] == "examples"
    assert outline.collapsed_examples >= 2 and outline.loose_examples == 0
    summary = page[page.index('id="summary"'):page.index('id="candidates"')]
    assert "The gate failed, so register will not register it: min_margin" in summary and "&lt; 50" in summary
    assert "gender terms flip 50.0%" in summary and "male-&gt;female (30 texts) raises P(food) by 0.400" in summary


def test_group_metrics_report_a_planted_gap_within_its_interval():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 2, n)
    groups = np.where(np.arange(n) < 300, "a", "b")
    pred = y.copy()
    # group a is right 90% of the time, group b 70%: a planted accuracy gap of 0.20
    for g, acc in (("a", 0.9), ("b", 0.7)):
        rows = np.flatnonzero(groups == g)
        wrong = rng.choice(rows, size=round(len(rows) * (1 - acc)), replace=False)
        pred[wrong] = 1 - pred[wrong]
    result = group_metrics(y, pred, pd.Series(groups), ["neg", "pos"], samples=500, confidence=0.95, seed=0)
    assert result["gaps"]["accuracy"] == pytest.approx(0.2)
    low, high = result["gap_ci"]["accuracy"]
    print(f"planted group gap 0.20: reported {result['gaps']['accuracy']:.3f} [{low:.3f}, {high:.3f}]")  # noqa: T201
    assert low <= 0.2 <= high and low > 0.1
    assert result["gap_direction"]["accuracy"] == {"lower": "b", "higher": "a"}
    assert {"false_positive_rate", "false_negative_rate", "selection_rate[pos]"} <= set(result["groups"]["a"])
    assert result["groups"]["a"]["accuracy"] == pytest.approx(0.9)


def test_swaps_keep_casing_and_pairs_and_skip_substrings():
    axis = IdentityAxis("gender", {"male": ["he", "his", "him"], "female": ["she", "her", "her"]})
    assert swap_terms("He said his theory suits him.", axis.swap_map("male", "female")) == \
        "She said her theory suits her."
    assert swap_terms("HER book. There she is.", axis.swap_map("female", "male")) == "HIS book. There he is."
    directions = counterfactual_pairs(["he ran", "nothing here", "she ran"], [axis], max_texts=10, seed=0)
    assert [(d["source"], list(d["rows"]), d["swapped"]) for d in directions] == [
        ("male", [0], ["she ran"]), ("female", [2], ["he ran"])]


def test_swaps_the_model_cannot_see_are_left_out_and_wide_axes_deal_one_target_per_text():
    axis = IdentityAxis("religion", {"a": ["alpha"], "b": ["beta"], "c": ["gamma"], "d": ["delta"]})
    texts = [f"text {i} about alpha" for i in range(12)] + ["alpha only past the window"]
    seen = lambda before, after: np.array(["window" not in b for b in before])  # noqa: E731
    directions = counterfactual_pairs(texts, [axis], max_texts=100, seed=0, visible=seen)
    from_a = [d for d in directions if d["source"] == "a"]
    rows = np.concatenate([d["rows"] for d in from_a])
    # every visible text is swapped exactly once, the invisible one never, and each target gets a share
    assert sorted(rows.tolist()) == list(range(12))
    assert sorted(len(d["rows"]) for d in from_a) == [4, 4, 4]
    for d in from_a:
        assert all(s == texts[i].replace("alpha", axis.groups[d["target"]][0]) for i, s in zip(d["rows"], d["swapped"], strict=True))


def test_memo_scorer_scores_each_token_sequence_once_and_matches_the_plain_loop(tiny_model_dir: Path):
    import torch

    from graft.modeling import embed, embedding_scorer, load_encoder, load_tokenizer, tokenize

    encoder, tokenizer = load_encoder(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = pd.read_csv(NEWS_CSV)["text"].tolist()[:10]
    cpu = torch.device("cpu")
    scorer = embedding_scorer(encoder, tokenizer, max_length=16, batch_size=4, device=cpu)
    plain = embed(encoder, tokenizer, texts, max_length=16, batch_size=4, device=cpu)
    np.testing.assert_allclose(scorer(texts), plain, atol=1e-5)
    distinct = len({tuple(ids) for ids in tokenize(tokenizer, texts, 16)})
    assert scorer.forwarded == distinct
    # an uncased vocabulary: upper case, doubled spaces and edits past the window tokenize alike
    long = [i for i, ids in enumerate(tokenize(tokenizer, texts, 512)) if len(ids) > 16]
    assert long, "the fixture needs texts longer than the window"
    edited = [t.upper() for t in texts] + ["  " + t.replace(" ", "  ") for t in texts] + [texts[i] + " kitchen" for i in long]
    np.testing.assert_allclose(scorer(edited), np.concatenate([plain, plain, plain[long]]), atol=1e-5)
    assert scorer.forwarded == distinct
    seeded = embedding_scorer(encoder, tokenizer, max_length=16, batch_size=4, device=cpu)
    seeded.seed(texts, plain)
    seeded(texts + ["kitchen robot league"])
    assert seeded.forwarded == 1


def test_counterfactual_probe_batches_all_swaps_in_one_call():
    calls = []

    def model(texts):
        calls.append(len(texts))
        return keyword_model(biased=True)(texts)

    texts = _synthetic(20, 0)["text"].tolist()
    axes = load_identity_terms()
    directions = counterfactual_pairs(texts, axes, max_texts=50, seed=0)
    counterfactual_probe(model, texts, directions, tolerance=0.1, finding=0.05, major=0.1)
    assert calls == [len(texts), sum(len(d["rows"]) for d in directions)]


def test_shipped_word_lists_and_probe_set_load(tmp_path: Path):
    axes = {a.name: a for a in load_identity_terms()}
    assert {"gender", "names_gender", "names_ethnicity", "religion", "nationality"} <= set(axes)
    assert len(axes["gender"].groups["male"]) == len(axes["gender"].groups["female"])
    frame, template_axes = load_template_probes(REPO / "graft/probes/sentiment_templates.csv")
    assert template_axes == ["gender", "ethnicity"] and frame["template"].nunique() >= 10
    assert (REPO / "graft/probes/README.md").read_text().count("identity_terms.csv") >= 1
    bad = tmp_path / "terms.csv"
    bad.write_text("axis,group,term\ngender,male,he\ngender,,she\n")
    with pytest.raises(GraftError, match=r"terms.csv: row 3"):
        load_identity_terms(bad)
    with pytest.raises(GraftError, match="missing column"):
        bad.write_text("words,group\n")
        load_template_probes(bad)


def test_template_probe_gap_is_zero_for_a_model_blind_to_identity():
    frame, axes = load_template_probes(REPO / "graft/probes/sentiment_templates.csv")
    result = template_probe(keyword_model(), frame, axes, CLASSES, samples=100, confidence=0.95, seed=0)
    assert result["gender"]["max_gap"] == 0.0 and result["ethnicity"]["max_gap"] == 0.0
    # templates are resampled whole, so a model blind to identity has a gap interval of exactly 0
    # even though its probabilities differ from template to template
    assert result["gender"]["templates"] == frame["template"].nunique()
    assert all(high == 0.0 for axis in ("gender", "ethnicity") for _, high in result[axis]["gap_ci"].values())

    def keyed_on_women(texts):  # "sport" whenever the subject is a woman
        out = np.full((len(texts), 2), [0.9, 0.1])
        out[[bool(re.search(r"\b(woman|sister|mother)\b", t.lower())) for t in texts]] = [0.1, 0.9]
        return out

    biased = template_probe(keyed_on_women, frame, axes, CLASSES, samples=200, confidence=0.95, seed=0)
    assert biased["gender"]["gap"]["sport"] == pytest.approx(0.8)
    low, high = biased["gender"]["gap_ci"]["sport"]
    assert low - 1e-9 <= 0.8 <= high + 1e-9
    assert biased["gender"]["mean_proba"]["female"]["sport"] == pytest.approx(0.9)
    assert biased["gender"]["gap_direction"] == {"sport": {"lower": "male", "higher": "female"},
                                                 "food": {"lower": "female", "higher": "male"}}
    widest = biased["gender"]["max_gap_direction"]  # with two classes both gaps are 0.8: either may be named
    assert widest == {"class": widest["class"], **biased["gender"]["gap_direction"][widest["class"]]}
    assert biased["ethnicity"]["max_gap"] == 0.0 and biased["ethnicity"]["max_gap_direction"]["lower"] is None


def test_cooccurrence_counts_terms_per_label():
    axis = IdentityAxis("gender", {"male": ["he"], "female": ["she"]})
    counts = cooccurrence(["he won", "she won", "she cooked", "they cooked"], ["sport", "sport", "food", "food"], [axis])
    assert counts["gender"]["female"]["per_label"] == {"food": 1, "sport": 1}
    assert counts["gender"]["male"]["per_label"] == {"food": 0, "sport": 1}
    assert counts["gender"]["male"]["absent_terms"] == []


def test_robustness_is_seeded_and_catches_a_case_sensitive_model():
    texts = _synthetic(30, 0)["text"].tolist()
    rows, perturbed = perturb(texts, seed=3, max_texts=20)
    assert perturb(texts, seed=3, max_texts=20)[1] == perturbed and len(rows) == 20
    assert all(a != b for a, b in zip(perturbed["typo"], [texts[i] for i in rows], strict=True))

    def case_sensitive(batch):
        out = np.zeros((len(batch), 2))
        out[np.arange(len(batch)), [int(t[:1].isupper() and t[1:2].islower()) for t in batch]] = 1
        return out

    result = robustness_probe(case_sensitive, texts, rows, perturbed, original_proba=case_sensitive(texts),
                              finding=0.05, major=0.1, classes=CLASSES)
    assert result["perturbations"]["casing"]["flip_rate"] > 0.3
    assert result["perturbations"]["punctuation"]["flip_rate"] == 0.0


# ---------------------------------------------------------------- a real run through DVC


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(root: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=root, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny pipeline run up to evaluate by `dvc repro evaluate`, then committed."""
    root = make_workspace(tmp_path_factory.mktemp("eval") / "ws", tiny_params(tiny_model_dir))
    pin_sources(root)
    _run(root, sys.executable, "-m", "dvc", "repro", "evaluate")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run")
    return root


def test_reports_follow_the_design_contract(evaluated: Path):
    metrics = read_json(evaluated / "reports/metrics.json")
    assert {"accuracy", "macro_f1"} <= set(metrics["test"]) and {"accuracy", "macro_f1"} <= set(metrics["val"])
    transfer = read_json(evaluated / "reports/transfer.json")
    strategies = yaml.safe_load((evaluated / "params.yaml").read_text())["train"]["strategies"]
    assert set(transfer["candidates"]) == {*strategies, "scratch", "tfidf", "backbone_probe"}
    assert transfer["proposed"] == read_json(evaluated / "models/finetuned/candidates.json")["proposed"]
    assert {transfer["candidates"][s]["role"] for s in strategies} == {"transferred"}
    for cand in transfer["candidates"].values():
        low, high = cand["test"]["accuracy_ci"]
        assert low <= cand["test"]["accuracy"] <= high
    assert transfer["verdict"] in {"positive", "no_gain", "negative"}
    assert transfer["negative_transfer"] is (transfer["verdict"] == "negative")
    assert transfer["margin"] == pytest.approx(
        transfer["candidates"][transfer["proposed"]]["test"]["accuracy"]
        - transfer["candidates"][transfer["best_baseline"]]["test"]["accuracy"])
    bias = read_json(evaluated / "reports/bias.json")
    probed = set(transfer["candidates"]) - {"scratch"}  # evaluate.probe_scratch: false
    assert set(bias["counterfactual"]) == probed
    assert set(bias["inherited_vs_added"]["gender"]) == probed
    for per_axis in bias["templates"]["candidates"].values():  # every gap says which group is lower
        assert all({"class", "lower", "higher"} <= set(r["max_gap_direction"]) for r in per_axis.values())
    assert all("mean_shift" in d for c in bias["counterfactual"].values() for d in c["directions"])
    gate_report = read_json(evaluated / "reports/gate.json")
    assert set(gate_report) == {"passed", "checks"} and len(gate_report["checks"]) == 7
    robustness = read_json(evaluated / "reports/robustness.json")
    assert set(robustness["candidates"]) == probed
    assert (evaluated / "reports/plots/confusion.png").read_bytes()[:4] == b"\x89PNG"
    html = (evaluated / "reports/report.html").read_text()
    assert "src=\"http" not in html and "<script" not in html  # self-contained


def test_dvc_metrics_and_plots_work_after_a_run(evaluated: Path):
    dvc = (sys.executable, "-m", "dvc")
    shown = _run(evaluated, *dvc, "metrics", "show")
    assert "reports/metrics.json" in shown and "test.accuracy" in shown
    params = evaluated / "params.yaml"
    original = params.read_text()
    assert "confidence: 0.95" in original
    params.write_text(original.replace("confidence: 0.95", "confidence: 0.9"))
    try:
        _run(evaluated, *dvc, "repro", "evaluate")
        diff = json.loads(_run(evaluated, *dvc, "metrics", "diff", "--json"))
        # the changed param moves exactly the metric it sets: DVC sees the new value
        assert diff["reports/transfer.json"]["confidence"]["old"] == 0.95
        assert diff["reports/transfer.json"]["confidence"]["new"] == 0.9
        # run facts sit in evaluate.json, which no stage reads, never in register's inputs
        assert "seconds" in read_json(evaluated / "reports/evaluate.json")
        assert not {"evaluate_seconds", "forward_passes"} & set(read_json(evaluated / "reports/metrics.json"))
        out = _run(evaluated, *dvc, "plots", "show", "-o", str(evaluated / "dvc_plots"))
        page = (evaluated / "dvc_plots" / "index.html").read_text()
        assert "confusion" in page and "counterfactual.png" in page, out
    finally:
        params.write_text(original)


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
def test_report_opens_in_headless_chromium_with_every_section(evaluated: Path, tmp_path: Path):
    browser = _chromium()
    page = (evaluated / "reports/report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,3000", page],
                   check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    dom = subprocess.run([browser, *flags, "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert dom.count("data:image/png;base64,") >= 4
    assert dom.index('id="summary"') < dom.index('id="candidates"') < dom.index('id="examples"')
