"""evaluate: every candidate's test metrics with intervals, the three-way transfer verdict, bias
(inherited from the backbone or added by fine-tuning), robustness, one gate over all of it, and
the report a person reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score

from graft import config
from graft.baselines import load_tfidf, select_C
from graft.bias import (
    Predictor,
    cooccurrence,
    counterfactual_pairs,
    counterfactual_probe,
    group_metrics,
    load_identity_terms,
    load_template_probes,
    template_probe,
)
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, atomic_write_text, read_json, write_json
from graft.layout import Layout, require
from graft.lengths import Tokenization, resolved_tokenization, token_lengths_png
from graft.modeling import (
    PROBE_HEAD_FILE,
    MemoScorer,
    embedding_scorer,
    load_classifier,
    load_encoder,
    load_tokenizer,
    proba_scorer,
    probe_head_normalizes,
    select_device,
    token_ids_cache,
)
from graft.report import (
    candidates_png,
    confusion_png,
    curve_section,
    domain_section,
    gate_failure_message,
    grouped_bars_png,
    note_png,
    render_html,
)
from graft.robustness import perturb, robustness_probe
from graft.stats import (
    bootstrap_indices,
    point_scores,
    transfer_verdict,
    verdict_over_seeds,
    verdict_sentence,
    with_intervals,
)

PROPOSED = "finetune"
SCRATCH = "scratch"
BASELINES = (SCRATCH, "tfidf")
BACKBONE_PROBE = "backbone_probe"
VERDICT_RANK = {"negative": 0, "no_gain": 1, "positive": 2}
REQUIRED_RANK = {"any": 0, "no_gain": 1, "positive": 2}


def cached(predict: Predictor) -> Predictor:
    """Memoise a predictor on the exact list of texts, so the test set is scored once per candidate."""
    memo: dict[tuple, np.ndarray] = {}

    def wrapped(texts: Sequence[str]) -> np.ndarray:
        key = tuple(texts)
        if key not in memo:
            memo[key] = predict(list(texts))
        return memo[key]

    return wrapped


def transformer_predictor(model_dir: Path, params: config.Params, tokens: Tokenization, device, name: str,
                          caches: dict | None = None) -> Predictor:
    """A saved classifier as texts -> probabilities, through the length-sorted inference loop,
    each distinct token sequence scored once (each text tokenized once per tokenizer definition
    across the scorers sharing `caches`)."""
    trust = params.model.trust_remote_code
    tokenizer, model = load_tokenizer(model_dir, trust_remote_code=trust), load_classifier(model_dir, trust_remote_code=trust)
    return proba_scorer(model, tokenizer, max_length=tokens.max_length, truncation=tokens.truncation,
                        batch_size=params.features.batch_size, device=device, desc=name, inference=tokens.inference,
                        token_ids=_token_ids(caches, tokenizer, tokens))


def _token_ids(caches: dict | None, tokenizer, tokens: Tokenization) -> dict | None:
    if caches is None:
        return None
    return token_ids_cache(caches, tokenizer, max_length=tokens.max_length, truncation=tokens.truncation)


def backbone_scorer(layout: Layout, params: config.Params, tokens: Tokenization, device,
                    splits: Mapping[str, pd.DataFrame], caches: dict | None = None) -> MemoScorer:
    """The frozen backbone's mean-pooled embeddings, seeded with the features stage's cached
    embeddings of every split: the probes below pay a forward pass only for new texts."""
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    scorer = embedding_scorer(load_encoder(layout.pretrained_dir, trust_remote_code=trust), tokenizer,
                              max_length=tokens.max_length, truncation=tokens.truncation,
                              batch_size=params.features.batch_size, device=device, desc=BACKBONE_PROBE,
                              inference=tokens.inference, token_ids=_token_ids(caches, tokenizer, tokens))
    for split, frame in splits.items():
        cached_rows = np.load(layout.features_file(split))
        if len(cached_rows) != len(frame):
            raise GraftError(f"{layout.features_file(split)}: {len(cached_rows)} rows, but "
                             f"{layout.split_file(split)} has {len(frame)}; run the features stage again")
        scorer.seed(frame["text"].tolist(), cached_rows)
    return scorer


def head_predictor(embeddings: Callable[[Sequence[str]], np.ndarray], weight: np.ndarray, bias: np.ndarray, *,
                   normalize: bool = False) -> Predictor:
    """A linear head over mean-pooled embeddings (L2-normalised first when `normalize`), as texts ->
    softmax probabilities."""
    def predict(texts: Sequence[str]) -> np.ndarray:
        x = embeddings(texts)
        if normalize:  # as torch.nn.functional.normalize: x / max(||x||, 1e-12)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return softmax(x @ weight.T + bias, axis=1).astype(np.float32)

    return predict


def shares_backbone(model_dir: Path, backbone: torch.nn.Module) -> bool:
    """Whether a probe model's encoder weights are the backbone's, tensor for tensor (a sharded
    or otherwise named weights file counts as different: the candidate is then scored alone)."""
    weights = Path(model_dir) / "model.safetensors"
    if not weights.exists():
        return False
    theirs = load_file(str(weights))
    ours = {k: v for k, v in backbone.state_dict().items() if not k.endswith("position_ids")}
    prefix = getattr(backbone, "base_model_prefix", "") + "."
    theirs = {k.removeprefix(prefix): v for k, v in theirs.items() if not k.endswith("position_ids")}
    return theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k].cpu()) for k in ours)


def probe_predictor(model_dir: Path, params: config.Params, tokens: Tokenization, device, name: str,
                    backbone: MemoScorer, caches: dict | None = None) -> Predictor:
    """A linear-probe candidate: its head over the shared backbone embeddings when its encoder is
    the backbone (always, for graft's own probes), else as its own model."""
    if shares_backbone(model_dir, backbone.model):
        head_file = Path(model_dir) / PROBE_HEAD_FILE
        head = load_file(str(head_file))
        return head_predictor(backbone, head["weight"].numpy(), head["bias"].numpy(),
                              normalize=probe_head_normalizes(head_file))
    return transformer_predictor(model_dir, params, tokens, device, name, caches)


def backbone_probe(scorer: MemoScorer, params: config.Params, *, train_texts: Sequence[str], labels: np.ndarray,
                   val_texts: Sequence[str], val_labels: np.ndarray, n_classes: int) -> tuple[Predictor, dict]:
    """Logistic regression on the frozen backbone's mean-pooled embeddings: what pretraining alone
    brings, before fine-tuning moves any weight. Trained on the cached train embeddings, its C
    fixed or (auto) chosen on validation over train.probe.C_grid as the linear_probe strategy's
    is: a probe held back by an untuned C would understate what the backbone brings."""
    train_x, val_x, val_y = scorer(train_texts), scorer(val_texts), np.asarray(val_labels)

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000, random_state=params.seed).fit(train_x, labels)

    clf, val_accuracy, facts = select_C(fit, lambda m: float((m.predict(val_x) == val_y).mean()),
                                        C=params.evaluate.probe_C, grid=params.train.probe.C_grid)

    def predict(batch: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(batch), n_classes), dtype=np.float32)
        if len(batch):
            out[:, clf.classes_] = clf.predict_proba(scorer(batch))  # classes missing from train get 0
        return out

    return predict, {**facts, "val_accuracy": val_accuracy}


def reuse_val_predictions(layout: Layout, val: pd.DataFrame, scorers: Mapping[str, MemoScorer]) -> None:
    """Seed each transformer candidate's scorer with the validation probabilities its best epoch
    produced in train (same weights, same texts), when they are for this val split."""
    if not layout.val_predictions.exists():
        return
    with np.load(layout.val_predictions, allow_pickle=False) as saved:
        if "ids" not in saved or saved["ids"].tolist() != val["id"].astype(str).tolist():
            return  # written for another split: predict validation again
        for name, scorer in scorers.items():
            key = f"proba/{name}"
            if key in saved and name != BACKBONE_PROBE:
                scorer.seed(val["text"].tolist(), saved[key])


def load_candidates(layout: Layout, params: config.Params, *, splits: Mapping[str, pd.DataFrame],
                    n_classes: int) -> tuple[dict[str, Predictor], dict, dict[str, MemoScorer]]:
    """Every candidate the train stage wrote (its manifest names them and the one proposed on
    validation), plus the frozen-backbone probe, as predictors; and the model scorers behind
    them (their `forwarded` counts say how much model work evaluation did). The proposed
    strategy's other seeds (train.seeds > 1) are returned in `manifest["seed_predictors"]`."""
    require(layout.candidates, layout.baselines_dir, layout.pretrained_dir, *(layout.features_file(s) for s in splits),
            root=layout.root)
    manifest = read_json(layout.candidates)
    tokens = resolved_tokenization(params, layout)  # the length and truncation the features stage embedded with
    device = select_device()
    caches: dict = {}  # text -> token ids, per tokenizer definition: every scorer below tokenizes a text once
    backbone = backbone_scorer(layout, params, tokens, device, splits, caches)
    scorers = {BACKBONE_PROBE: backbone}
    predictors: dict[str, Predictor] = {}
    for name, cand in manifest["candidates"].items():
        path = Path(layout.root) / cand["path"]
        if cand["kind"] == "tfidf":
            predictors[name] = load_tfidf(path)
        elif (path / PROBE_HEAD_FILE).exists():
            predictors[name] = probe_predictor(path, params, tokens, device, name, backbone, caches)
            if isinstance(predictors[name], MemoScorer):  # scored as its own model (setfit's trained body)
                scorers[name] = predictors[name]
        else:
            predictors[name] = scorers[name] = transformer_predictor(path, params, tokens, device, name, caches)
    reuse_val_predictions(layout, splits["val"], scorers)
    seed_predictors = {}
    for seed, run in (manifest.get("seeds") or {}).get("models", {}).items():
        name = f"{manifest['proposed']}-seed-{seed}"
        seed_predictors[int(seed)] = scorers[name] = transformer_predictor(Path(layout.root) / run["path"], params,
                                                                           tokens, device, name, caches)
    manifest["seed_predictors"] = seed_predictors
    train, val = splits["train"], splits["val"]
    predictors[BACKBONE_PROBE], manifest["backbone_probe"] = backbone_probe(
        backbone, params, train_texts=train["text"].tolist(), labels=train["label_id"].to_numpy(),
        val_texts=val["text"].tolist(), val_labels=val["label_id"].to_numpy(), n_classes=n_classes)
    return predictors, manifest, scorers


def adaptation_verdicts(y_test: np.ndarray, pred: Mapping[str, np.ndarray], adaptations: Mapping[str, Mapping],
                        resamples: np.ndarray, *, confidence: float, alpha: float) -> dict:
    """Each adaptation candidate against its reference, the same strategy without adapting: the
    transfer verdict's paired test (exact McNemar) and paired-bootstrap interval of the margin
    (in the test record, `transferred` is the adapted candidate, `baseline` the reference)."""
    methods = {}
    for name, adaptation in adaptations.items():
        reference = adaptation["reference"]
        verdict = transfer_verdict(y_test, pred[name], {reference: pred[reference]}, resamples,
                                   confidence=confidence, alpha=alpha)
        verdict.pop("best_baseline")
        verdict.pop("negative_transfer")
        methods[name] = {"method": adaptation["method"], "reference": reference, **verdict}
    return {"methods": methods, "confidence": confidence,
            "note": "each method against the same strategy trained from the pretrained backbone on the same labels"}


def gate(params: config.GateParams, *, metrics: Mapping, verdict: Mapping, group_gap: float | None,
         counterfactual_flip_rate: float | None, robustness_flip_rate: float | None,
         adaptation: Mapping | None = None) -> dict:
    """One check per threshold, each {name, value, threshold, passed}; a measure that could not be
    taken (no group columns, no probe texts) passes with value None. Each adaptation method gets
    a check of its verdict against not adapting."""
    def upper(name: str, value: float | None, threshold: float) -> dict:
        return {"name": name, "value": value, "threshold": threshold, "passed": value is None or value <= threshold}

    checks = [
        {"name": "verdict", "value": verdict["verdict"], "threshold": params.required_verdict,
         "passed": VERDICT_RANK[verdict["verdict"]] >= REQUIRED_RANK[params.required_verdict]},
        {"name": "min_margin", "value": verdict["margin_points"], "threshold": params.min_margin,
         "passed": verdict["margin_points"] >= params.min_margin},
        {"name": "min_accuracy", "value": metrics["accuracy"], "threshold": params.min_accuracy,
         "passed": metrics["accuracy"] >= params.min_accuracy},
        {"name": "min_macro_f1", "value": metrics["macro_f1"], "threshold": params.min_macro_f1,
         "passed": metrics["macro_f1"] >= params.min_macro_f1},
        upper("max_group_gap", group_gap, params.max_group_gap),
        upper("max_counterfactual_flip_rate", counterfactual_flip_rate, params.max_counterfactual_flip_rate),
        upper("max_robustness_flip_rate", robustness_flip_rate, params.max_robustness_flip_rate),
    ]
    for name, m in (adaptation or {}).get("methods", {}).items():
        checks.append({"name": f"adaptation_verdict:{name}", "value": m["verdict"],
                       "threshold": params.required_adaptation_verdict,
                       "passed": VERDICT_RANK[m["verdict"]] >= REQUIRED_RANK[params.required_adaptation_verdict]})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _resolve(path: str, layout: Layout) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(layout.root) / p


def assess(
    predictors: Mapping[str, Predictor], *, params: config.Params, layout: Layout,
    train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: list[str], group_columns: Sequence[str],
    domain_column: str | None = None, proposed: str = PROPOSED, transferred: Sequence[str] = (PROPOSED,),
    visible: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
    seed_predictors: Mapping[int, Predictor] | None = None, backbone_probe_facts: Mapping | None = None,
    adaptations: Mapping[str, Mapping] | None = None,
) -> dict:
    """Everything evaluate reports, from predictors and data frames (no model files): tests call it
    with planted models. `proposed` is the candidate train chose on validation; `transferred` names
    every candidate that starts from the pretrained backbone. `visible(originals, edited)` says
    which edits change what the transformer models see (counterfactual swaps past the
    truncation point are left out). `seed_predictors` are the proposed strategy trained with
    other seeds (params.seed is the proposed model's): scored on test for the verdict's seed rule.
    `adaptations` names each adaptation candidate's method and reference (the same strategy, not
    adapted)."""
    e, n_classes = params.evaluate, len(classes)
    predictors = {name: cached(p) for name, p in predictors.items()}
    test_texts, val_texts = test["text"].tolist(), val["text"].tolist()
    proba = {name: p(test_texts) for name, p in predictors.items()}
    pred = {name: pr.argmax(1) for name, pr in proba.items()}
    y_test, y_val = test["label_id"].to_numpy(), val["label_id"].to_numpy()

    resamples = bootstrap_indices(len(y_test), e.bootstrap_samples, params.seed)
    candidates = {
        name: {"role": "transferred" if name in transferred else "backbone_probe" if name == BACKBONE_PROBE else "baseline",
               "test": with_intervals(y_test, pred[name], resamples, e.confidence, n_classes)}
        for name in predictors
    }
    if BACKBONE_PROBE in candidates and backbone_probe_facts:
        candidates[BACKBONE_PROBE].update(backbone_probe_facts)  # its C, and the validation search behind it
    for name, c in candidates.items():
        if name != BACKBONE_PROBE:
            c["val"] = point_scores(y_val, predictors[name](val_texts).argmax(1), n_classes)
    by_seed = {params.seed: pred[proposed],
               **{s: p(test_texts).argmax(1) for s, p in (seed_predictors or {}).items() if s != params.seed}}
    verdict = verdict_over_seeds(y_test, by_seed, {b: pred[b] for b in BASELINES if b in pred}, resamples,
                                 base_seed=params.seed, confidence=e.confidence, alpha=e.alpha, seed=params.seed)
    transfer = {"proposed": proposed, "candidates": candidates, "confidence": e.confidence, **verdict}
    adaptation = adaptation_verdicts(y_test, pred, adaptations or {}, resamples, confidence=e.confidence, alpha=e.alpha)
    metrics = {"model": proposed}
    for split, y, texts in (("test", y_test, test_texts), ("val", y_val, val_texts)):
        p = predictors[proposed](texts).argmax(1)
        f1 = f1_score(y, p, average=None, labels=range(n_classes), zero_division=0)
        metrics[split] = {**point_scores(y, p, n_classes), "per_class_f1": dict(zip(classes, f1.tolist(), strict=True))}

    # bias: counterfactual swaps, template probes, groups, co-occurrence; the model probes skip the
    # scratch baseline unless evaluate.probe_scratch (group metrics reuse test predictions: all)
    probed = {name: p for name, p in predictors.items() if e.probe_scratch or name != SCRATCH}
    axes = load_identity_terms(_resolve(e.identity_terms, layout))
    directions = counterfactual_pairs(test_texts, axes, max_texts=e.max_probe_texts, seed=params.seed,
                                      visible=visible)
    thresholds = {"finding_flip_rate": e.finding_flip_rate, "major_flip_rate": e.major_flip_rate,
                  "tv_tolerance": e.tv_tolerance}
    counterfactual = {
        name: counterfactual_probe(p, test_texts, directions, tolerance=e.tv_tolerance, finding=e.finding_flip_rate,
                                   major=e.major_flip_rate, examples=e.examples, original_proba=proba[name],
                                   classes=classes)
        for name, p in probed.items()
    }
    templates: dict = {"file": e.template_probes, "candidates": {}}
    if e.template_probes:
        frame, template_axes = load_template_probes(_resolve(e.template_probes, layout))
        templates["axes"] = template_axes
        templates["candidates"] = {
            name: template_probe(p, frame, template_axes, classes, samples=e.bootstrap_samples,
                                 confidence=e.confidence, seed=params.seed)
            for name, p in probed.items()
        }
    groups, domains = {}, {}
    # prepare carries the domain column into the splits as `domain` (groups keep their names)
    for target, columns in ((groups, [(c, c) for c in group_columns]),
                            (domains, [(domain_column, "domain")] if domain_column else [])):
        for column, stored in columns:
            if stored not in test.columns:
                raise GraftError(f"{layout.split_file('test')}: datacard names column {column!r}, but the split lacks it")
            target[column] = {name: group_metrics(y_test, pred[name], test[stored], classes, samples=e.bootstrap_samples,
                                                  confidence=e.confidence, seed=params.seed)
                              for name in predictors}
    bias = {
        "thresholds": thresholds,
        "group_columns": list(group_columns),
        "groups": groups,
        "domains": domains,
        "counterfactual": counterfactual,
        "templates": templates,
        "cooccurrence": cooccurrence(train["text"].tolist(), train["label"].astype(str).tolist(), axes),
        "inherited_vs_added": {
            axis.name: {name: counterfactual[name]["axes"].get(axis.name, {}).get("flip_rate") for name in probed}
            for axis in axes
        },
        "note": ("An identity term absent from the training data has zero weight in TF-IDF, so a flip under "
                 "swapping it can only come from pretraining (see backbone_probe vs finetune)."),
    }

    # robustness
    rows, perturbed = perturb(test_texts, seed=params.seed, max_texts=e.max_probe_texts)
    robustness = {"candidates": {
        name: robustness_probe(p, test_texts, rows, perturbed, original_proba=proba[name], finding=e.finding_flip_rate,
                               major=e.major_flip_rate, classes=classes, examples=e.examples)
        for name, p in probed.items()}}

    group_gaps = [max(g[proposed]["gaps"]["accuracy"], g[proposed]["gaps"]["macro_f1"]) for g in groups.values()]
    result_gate = gate(params.gate, metrics=metrics["test"], verdict=verdict,
                       group_gap=max(group_gaps) if group_gaps else None,
                       counterfactual_flip_rate=counterfactual[proposed]["max_flip_rate"],
                       robustness_flip_rate=robustness["candidates"][proposed]["max_flip_rate"], adaptation=adaptation)
    metrics["probes"] = {"counterfactual_max_flip_rate": counterfactual[proposed]["max_flip_rate"],
                         "robustness_max_flip_rate": robustness["candidates"][proposed]["max_flip_rate"]}
    return {"proposed": proposed, "metrics": metrics, "transfer": transfer, "bias": bias, "robustness": robustness,
            "gate": result_gate, "adaptation": adaptation,
            "predictions": pred, "y_test": y_test, "proposed_test_proba": proba[proposed]}


def plots(result: Mapping, classes: list[str]) -> dict[str, bytes]:
    """PNG bytes of every plot, shared by reports/plots/ and the inline report (every one is a
    declared output, so each is written, saying so when there is nothing to show)."""
    pred, y = result["predictions"][result["proposed"]], result["y_test"]
    matrix = confusion_matrix(y, pred, labels=range(len(classes)))
    cf = result["bias"]["counterfactual"]
    rob = result["robustness"]["candidates"]
    out = {
        "confusion": confusion_png(matrix, classes, f"{result['proposed']}: test accuracy {result['metrics']['test']['accuracy']:.3f}"),
        "candidates": candidates_png(result["transfer"]["candidates"]),
        "counterfactual": grouped_bars_png({n: {a: v["flip_rate"] for a, v in c["axes"].items()} for n, c in cf.items()},
                                           "counterfactual flip rate"),
        "robustness": grouped_bars_png({n: {k: v["flip_rate"] for k, v in c["perturbations"].items()} for n, c in rob.items()},
                                       "robustness flip rate"),
    }
    if result["bias"]["groups"]:
        bars = {f"{col}:{cand}": {g: m["accuracy"] for g, m in r["groups"].items()}
                for col, per in result["bias"]["groups"].items() for cand, r in per.items()}
        out["groups"] = grouped_bars_png(bars, "accuracy per group")
    else:
        out["groups"] = note_png("no group columns (data.group_columns)")
    return out


def predictions_of(candidate: str, proba: np.ndarray, test: pd.DataFrame, classes: list[str], *,
                   inference: str = "fp32") -> dict:
    """A candidate's test predictions, row by row, as evaluate scored them (in the `inference`
    mode): register compares the served model with these (deterministic: no run facts)."""
    proba = np.asarray(proba, dtype=np.float64)
    return {"candidate": candidate, "inference": inference, "classes": classes, "ids": test["id"].astype(str).tolist(),
            "labels": [classes[i] for i in proba.argmax(1)], "probabilities": proba.tolist()}


def optional_sections(layout: Layout) -> dict[str, tuple[str, str]]:
    """The sections of the optional stages that ran (curve, domain): their reports, when on."""
    sections = {}
    for sid, title, report, plot, render in (
            ("curve", "Data-efficiency curve", layout.curve_report, layout.curve_plot, curve_section),
            ("domain", "Domain gap", layout.domain_report, layout.domain_plot, domain_section)):
        found = read_json(report) if report.exists() else {}
        if found.get("enabled"):
            sections[sid] = (title, render(found, plot.read_bytes() if plot.exists() else None))
    return sections


def evaluate(params: config.Params, *, layout: Layout | None = None) -> dict:
    """Write reports/{metrics,transfer,bias,robustness,gate}.json, plots and report.html, and the
    run facts in reports/evaluate.json; return them."""
    layout = layout or Layout()
    started = time.perf_counter()
    require(layout.datacard, root=layout.root)
    card = read_json(layout.datacard)
    try:
        classes = list(card["classes"])
    except KeyError:
        raise GraftError(f"{layout.datacard}: missing key 'classes'") from None
    group_columns = list(card.get("group_columns") or [])
    domain_column = card.get("domain_column")
    splits = {}
    for name in ("train", "val", "test"):
        require(layout.split_file(name), root=layout.root)
        splits[name] = pd.read_parquet(layout.split_file(name))
        missing = {"text", "label", "label_id"} - set(splits[name].columns)
        if missing:
            raise GraftError(f"{layout.split_file(name)}: missing column(s) {sorted(missing)}")
    predictors, manifest, scorers = load_candidates(layout, params, splits=splits, n_classes=len(classes))
    transferred = [n for n, c in manifest["candidates"].items() if c["role"] in ("transfer", "adaptation")]
    adaptations = {n: c for n, c in manifest["candidates"].items() if c["role"] == "adaptation"}
    result = assess(predictors, params=params, layout=layout, **splits, classes=classes,
                    group_columns=group_columns, domain_column=domain_column, proposed=manifest["proposed"],
                    transferred=transferred, visible=scorers[BACKBONE_PROBE].changed,
                    seed_predictors=manifest["seed_predictors"], backbone_probe_facts=manifest["backbone_probe"],
                    adaptations=adaptations)
    images = plots(result, classes)
    for name, png in images.items():
        with atomic_path(layout.plots_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    confusion_rows = pd.DataFrame({"actual": [classes[i] for i in result["y_test"]],
                                   "predicted": [classes[i] for i in result["predictions"][result["proposed"]]]})
    atomic_write_text(layout.plots_dir / "confusion.csv", confusion_rows.to_csv(index=False))
    write_json(layout.test_predictions, predictions_of(result["proposed"], result["proposed_test_proba"],
                                                         splits["test"], classes,
                                                         inference=resolved_tokenization(params, layout).inference))
    write_json(layout.metrics, result["metrics"])
    write_json(layout.transfer, result["transfer"])
    write_json(layout.bias, result["bias"])
    write_json(layout.robustness, result["robustness"])
    write_json(layout.gate, result["gate"])
    lengths = read_json(layout.sequence_length) if layout.sequence_length.exists() else None
    write_json(layout.adaptation, result["adaptation"])
    atomic_write_text(layout.report_html, render_html(
        transfer=result["transfer"], gate=result["gate"], bias=result["bias"], robustness=result["robustness"],
        datacard=card, sequence_length=lengths, extra=optional_sections(layout), adaptation=result["adaptation"],
        selection=read_json(layout.manifest).get("selection"),
        plots={**images, "token_lengths": token_lengths_png(lengths) if lengths else None}))
    # run facts go to a report no stage depends on: register reads the reports above, and must
    # find them unchanged when the same models are evaluated again
    result["run_facts"] = {"seconds": round(time.perf_counter() - started, 2),
                           "forward_passes": {name: s.forwarded for name, s in scorers.items()}}
    write_json(layout.evaluate_report, result["run_facts"])
    return result


def closing_line(transfer: Mapping, gate_report: Mapping) -> str:
    """The run's last line: the verdict in words and the gate."""
    failure = gate_failure_message(gate_report)
    return f"evaluate: {verdict_sentence(transfer, transfer['proposed'])} " + (f"{failure}." if failure else "Gate passed.")


def _summary_lines(result: Mapping) -> list[str]:
    fmt: Callable[[float | None], str] = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for name, cand in result["transfer"]["candidates"].items():
        t = cand["test"]
        low, high = t["accuracy_ci"]
        cf = result["bias"]["counterfactual"].get(name, {}).get("max_flip_rate")  # None: not probed
        rob = result["robustness"]["candidates"].get(name, {}).get("max_flip_rate")
        lines.append(f"evaluate: {name:14s} test accuracy {t['accuracy']:.4f} [{low:.4f}, {high:.4f}], "
                     f"macro-F1 {t['macro_f1']:.4f}, counterfactual flips {fmt(cf)}, robustness flips {fmt(rob)}")
    return lines


@exits_cleanly
def main() -> None:
    result = evaluate(config.load())
    for line in _summary_lines(result):
        print(line)  # noqa: T201
    for name, m in result["adaptation"]["methods"].items():
        low, high = (100 * x for x in m["margin_ci"])
        print(f"evaluate: adaptation {name}: {m['verdict']} against {m['reference']}, "  # noqa: T201
              f"{m['margin_points']:+.2f} points [{low:+.2f}, {high:+.2f}], McNemar p={m['test']['p_value']:.3g}")
    print(closing_line(result["transfer"], result["gate"]))  # noqa: T201


if __name__ == "__main__":
    main()
