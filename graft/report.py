"""The report a person reads: plots as PNG bytes, one self-contained HTML page (plots inline as
base64, no external CSS or scripts), and a short markdown summary for a Prefect artifact."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from graft.stats import verdict_sentence  # noqa: E402

# Every section of the page, in reading order: the answer first, the evidence after it, the raw
# examples last; tests check each id is in the rendered DOM.
SECTIONS = {
    "summary": "Summary",
    "candidates": "Candidates",
    "backbone": "Backbone choice",
    "adaptation": "Domain adaptation",
    "confusion": "Confusion matrix",
    "groups": "Per-group metrics",
    "counterfactual": "Counterfactual probes",
    "templates": "Template probes",
    "cooccurrence": "Identity terms in the training data",
    "robustness": "Robustness",
    "gate": "Gate",
    "datacard": "Data card",
    "sequence_length": "Sequence length",
    "examples": "Examples",
}
INHERITED_NOTE = (
    "An identity term absent from the training data has zero weight in TF-IDF, so a change under "
    "swapping it can only come from pretraining: compare the frozen backbone's linear probe "
    "(what pretraining brought) with the fine-tuned model (what fine-tuning kept or added)."
)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """Counts of true (rows) vs predicted (columns) classes."""
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    return _png(fig)


def candidates_png(candidates: Mapping[str, Mapping]) -> bytes:
    """Test accuracy and macro-F1 of every candidate with their bootstrap intervals."""
    names = list(candidates)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.2))
    x = np.arange(len(names))
    for offset, metric in ((-0.2, "accuracy"), (0.2, "macro_f1")):
        values = np.array([candidates[n]["test"][metric] for n in names])
        ci = np.array([candidates[n]["test"][f"{metric}_ci"] for n in names])
        ax.bar(x + offset, values, width=0.4, label=metric,
               yerr=np.abs(np.stack([values - ci[:, 0], ci[:, 1] - values])), capsize=3)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    return _png(fig)


def grouped_bars_png(values: Mapping[str, Mapping[str, float | None]], ylabel: str, threshold: float | None = None) -> bytes:
    """Bars per category (x) and per candidate (colour): counterfactual or robustness flip rates."""
    categories = sorted({c for per in values.values() for c in per})
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(categories) + 2), 3.2))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        heights = [values[name].get(c) or 0.0 for c in categories]
        ax.bar(np.arange(len(categories)) + k * width - 0.4 + width / 2, heights, width=width, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label="gate")
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def note_png(message: str) -> bytes:
    """A plot that says why there is nothing to plot (a declared output is always written)."""
    fig, ax = plt.subplots(figsize=(4.0, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return _png(fig)


def curve_png(curve: Mapping) -> bytes:
    """Test accuracy against labels per class (log scale), each point with its interval."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for method, points in curve["curves"].items():
        xs = [p["labels_per_class"] for p in points]
        acc = np.array([p["accuracy"] for p in points])
        ci = np.array([p["accuracy_ci"] for p in points])
        ax.errorbar(xs, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], marker="o", capsize=3, label=method)
    ax.axhline(curve["target_accuracy"], color="grey", linestyle=":",
               label=f"{curve['target_share']:.0%} of full-data accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("training labels per class")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    return _png(fig)


def domain_png(domain: Mapping, projection: np.ndarray, is_target: np.ndarray) -> bytes:
    """Proxy A-distance per layer, and a 2-D PCA projection of both domains (last layer)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    layers = domain["layers"]
    pad = np.array([layer["proxy_a_distance"] for layer in layers])
    ci = np.array([layer["proxy_a_distance_ci"] for layer in layers])
    left.errorbar(range(len(layers)), pad, yerr=[pad - ci[:, 0], ci[:, 1] - pad], marker="o", capsize=3)
    left.set_xlabel("layer (0: embeddings)")
    left.set_ylabel("proxy A-distance")
    for mask, name in ((~is_target, domain["source"]), (is_target, domain["target"])):
        right.scatter(projection[mask, 0], projection[mask, 1], s=6, alpha=0.5, label=str(name))
    right.set_title("PCA of the last layer")
    right.legend(fontsize=8)
    return _png(fig)


def curve_section(curve: Mapping, png: bytes | None) -> str:
    """The data-efficiency curve in a table and a plot, with the catch-up size and labels needed."""
    need = curve["labels_needed"]
    rows = [[m, p["size"], p["labels"], p["seeds"], p["accuracy"], _interval(p["accuracy_ci"])]
            for m, points in curve["curves"].items() for p in points]
    words = (f"<p>TF-IDF catches up with transfer (their intervals overlap from there on) at "
             f"<b>{html_text(curve['catch_up_size'])}</b> labels per class. Labels per class for "
             f"{_num(curve['target_accuracy'])} ({curve['target_share']:.0%} of the full-data accuracy): "
             + "; ".join(f"{html_text(m)} {'at most ' if n.get('at_most') else ''}{_num(n['labels_per_class'])} "
                         f"{_interval(n['ci']) if n['ci'] else ''}" for m, n in need.items()) + ".</p>")
    return words + _table(["candidate", "labels per class", "labels", "seeds", "test accuracy", "interval"],
                          rows) + _img(png, "data-efficiency curve")


def domain_section(domain: Mapping, png: bytes | None) -> str:
    """Proxy A-distance and MMD per layer, and source-only vs target-trained accuracy."""
    rows = [[layer["layer"], layer["proxy_a_distance"], _interval(layer["proxy_a_distance_ci"]), layer["mmd2"],
             _interval(layer["mmd2_ci"]), layer["mmd_p_value"]] for layer in domain["layers"]]
    acc = domain["target_test"]
    words = (f"<p>Source <b>{html_text(domain['source'])}</b>, target <b>{html_text(domain['target'])}</b>: "
             + "; ".join(f"{html_text(k)} {_num(v['accuracy'])} {_interval(v['accuracy_ci'])}"
                         for k, v in acc["candidates"].items()) + " on the target's test split.</p>")
    return words + _table(["layer", "proxy A-distance", "interval", "MMD²", "interval", "permutation p"],
                          rows) + _img(png, "domain gap")


def html_text(value, limit: int | None = None) -> str:
    """Data text (articles, labels, group names) as HTML, escaped exactly once. Source texts may
    carry HTML entities of their own (the BBC corpus writes `&#163;1.8m`); they are decoded first
    so the page shows £1.8m, and cut after decoding so no entity is cut in half."""
    decoded = html.unescape("—" if value is None else str(value))
    return html.escape(decoded if limit is None else decoded[:limit])


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return "<p><em>no plot: nothing to show</em></p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html_text(v)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _examples(items: Sequence[Mapping], key: str) -> str:
    lis = "".join(f"<li>{html_text(e['text'], 200)} → <b>{html_text(e[key], 200)}</b> "
                  f"({html_text(e['before'])} → {html_text(e['after'])}, TV {e['tv']:.3f})</li>"
                  for e in items)
    return f"<ul class=examples>{lis}</ul>"


def _collapsed(title: str, body: str) -> str:
    return f"<details><summary>{title}</summary>{body}</details>"


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(rate: float | None) -> str:
    return "—" if rate is None else f"{100 * rate:.1f}%"


def _interval(ci: Sequence[float]) -> str:
    return "[{:.3f}, {:.3f}]".format(*ci)


def check_words(check: Mapping) -> str:
    """A failed gate check with its value and the threshold it missed, e.g. `min_margin 0.86 < 1`."""
    name, value, threshold = check["name"], check["value"], check["threshold"]
    if name == "verdict":
        return f"verdict {value} (required: {threshold} or better)"
    return f"{name} {_num(value)} {'>' if name.startswith('max_') else '<'} {_num(threshold)}"


def registration_sentence(gate: Mapping) -> str:
    """Registered or not, and why: at evaluate time that is the gate's decision."""
    if gate["passed"]:
        return "The gate passed: register will register it as challenger."
    failed = [check_words(c) for c in gate["checks"] if not c["passed"]]
    return "The gate failed, so register will not register it: " + "; ".join(failed) + "."


def _shift_words(shift: Mapping | None) -> str:
    if not shift or shift["change"] == 0:
        return "no class's probability moves on average"
    verb = "raises" if shift["change"] > 0 else "lowers"
    return f"{verb} P({shift['class']}) by {abs(shift['change']):.3f} on average"


def findings(transfer: Mapping, bias: Mapping, robustness: Mapping) -> list[str]:
    """The top findings about the proposed candidate as sentences (plain text), each with its
    size and, for a gap, its direction: which group the model rates lower."""
    proposed = transfer["proposed"]
    level = f"{round(100 * transfer.get('confidence', 0.95))}%"
    out = []
    mine = transfer["candidates"][proposed]["test"]
    line = f"{proposed}: test accuracy {mine['accuracy']:.4f} {_interval(mine['accuracy_ci'])}"
    if transfer.get("best_baseline") in transfer["candidates"]:
        best = transfer["candidates"][transfer["best_baseline"]]["test"]
        line += f" against {transfer['best_baseline']} {best['accuracy']:.4f} {_interval(best['accuracy_ci'])}"
    out.append(line + f" ({level} intervals).")

    cf = bias["counterfactual"].get(proposed, {})
    measured = {a: r for a, r in cf.get("axes", {}).items() if r["flip_rate"] is not None}
    if measured:
        axis = max(measured, key=lambda a: measured[a]["flip_rate"])
        r = measured[axis]
        moves = [d for d in cf["directions"] if d["axis"] == axis and d.get("largest_shift")]
        # the direction that moves most probability in total, so one odd text does not speak for the axis
        biggest = max(moves, key=lambda d: abs(d["largest_shift"]["change"]) * d["n"], default=None)
        backbone = bias["counterfactual"].get("backbone_probe", {}).get("axes", {}).get(axis, {}).get("flip_rate")
        line = (f"Counterfactual swaps: {axis} terms flip {_pct(r['flip_rate'])} of {proposed}'s predictions "
                f"({r['n']} swapped texts, {r['severity']}")
        line += f"; the frozen backbone's probe flips {_pct(backbone)})" if backbone is not None else ")"
        if biggest:
            line += (f"; swapping {biggest['direction']} ({biggest['n']} texts) "
                     f"{_shift_words(biggest['largest_shift'])}")
        out.append(line + ".")
    else:
        out.append("Counterfactual swaps: no test text mentions an identity term, so nothing was swapped.")

    tp = (bias.get("templates") or {}).get("candidates", {}).get(proposed) or {}
    if tp:
        axis = max(tp, key=lambda a: tp[a]["max_gap"])
        r = tp[axis]
        d = r.get("max_gap_direction") or {}
        if d.get("lower") is None:
            out.append(f"Template probes: no gap between {axis} groups in any class's mean probability.")
        else:
            ci = _interval(r["gap_ci"][d["class"]])
            out.append(f"Template probes: the largest gap is on {axis}: {proposed} gives {d['lower']} templates a "
                       f"P({d['class']}) {r['max_gap']:.3f} lower than {d['higher']} templates ({level} interval {ci}).")

    gaps = [(column, metric, g[proposed]["gaps"][metric], g[proposed].get("gap_direction", {}).get(metric, {}),
             g[proposed]["gap_ci"][metric])
            for column, g in bias.get("groups", {}).items() if proposed in g for metric in ("accuracy", "macro_f1")]
    if gaps:
        column, metric, gap, direction, ci = max(gaps, key=lambda x: x[2])
        if direction.get("lower") is None:
            out.append(f"Per-group metrics: no {metric} gap between the groups of {column}.")
        else:
            out.append(f"Per-group metrics: {metric} is {gap:.3f} lower for {column}={direction['lower']} than for "
                       f"{column}={direction['higher']} ({level} interval {_interval(ci)}).")

    rob = robustness["candidates"].get(proposed, {}).get("perturbations", {})
    rated = {k: v for k, v in rob.items() if v["flip_rate"] is not None}
    if rated:
        kind = max(rated, key=lambda k: rated[k]["flip_rate"])
        if rated[kind]["flip_rate"] == 0:
            out.append(f"Robustness: none of {len(rated)} kinds of perturbation flips any of {proposed}'s predictions.")
        else:
            out.append(f"Robustness: {kind} perturbations flip {_pct(rated[kind]['flip_rate'])} of {proposed}'s "
                       f"predictions, the most of {len(rated)} kinds ({rated[kind]['severity']}).")
    return out


def _backbone(selection: Mapping | None) -> str:
    """The select stage's ranking (scores on layer-averaged frozen features), the choice and the
    freezing depth that train.freeze_layers auto takes."""
    if not selection:
        return "<p>No backbone selection recorded (models/pretrained/manifest.json).</p>"
    rows = [[r["candidate"], r["ref"], r["logme"], r["hscore"], r["knn_val_accuracy"],
             "chosen" if r["candidate"] == selection["chosen"] else
             next((s["reason"] for s in selection["skipped"] if s["candidate"] == r["candidate"]), "")]
            for r in selection["ranked"]]
    return (f"<p>{html_text(selection['rule'])}. Chosen: <code>{html_text(selection['ref'])}</code>; "
            f"freeze_layers auto: {selection['freeze_layers_auto']}. A score ranks backbones on this data set; "
            "alone it means nothing.</p>"
            + _table(["candidate", "ref", "LogME", "H-score", "k-NN val accuracy", "choice"], rows)
            + "<p>Per layer and with seconds: reports/transferability.json and reports/plots/transferability.png.</p>")


def _summary(transfer: Mapping, gate: Mapping, bias: Mapping, robustness: Mapping) -> str:
    verdict = transfer["verdict"]
    items = "".join(f"<li>{html_text(f)}</li>" for f in findings(transfer, bias, robustness))
    gate_class = "passed" if gate["passed"] else "failed"
    return (f"<p class='verdict {html.escape(verdict)}'>{html_text(verdict_sentence(transfer, transfer['proposed']))}</p>"
            f"<p class='gate {gate_class}'>{html_text(registration_sentence(gate))}</p>"
            f"<h3>Top findings</h3><ul>{items}</ul>")


def _seeds(transfer: Mapping) -> str:
    """The proposed strategy's test accuracy per seed and the spread, when it was trained with several."""
    seeds = transfer.get("seeds") or {}
    if seeds.get("n", 1) < 2:
        return ""
    rows = [[s, r["accuracy"], r["margin_points"], r["p_value"], r["verdict"]] for s, r in seeds["per_seed"].items()]
    low, high = (100 * x for x in seeds["margin_ci"])
    return (f"<h3>{html_text(transfer['proposed'])} over {seeds['n']} seeds</h3>"
            + _table(["seed", "test accuracy", f"margin over {transfer['best_baseline']} (points)", "McNemar p",
                      "paired-test verdict"], rows)
            + f"<p>Test accuracy mean {_num(seeds['accuracy_mean'])}, sd {_num(seeds['accuracy_sd'])}, min "
              f"{_num(seeds['accuracy_min'])}, max {_num(seeds['accuracy_max'])}; margin interval over seeds and test "
              f"rows [{low:+.2f}, {high:+.2f}] points. Verdict {html_text(transfer['verdict'])} (base seed alone: "
              f"{html_text(transfer.get('base_seed_verdict'))}); rule: {html_text(seeds['rule'])}.</p>")


def _direction_cells(direction: Mapping | None) -> list:
    direction = direction or {}
    return [direction.get("lower"), direction.get("higher")]


def render_html(*, transfer: Mapping, gate: Mapping, bias: Mapping, robustness: Mapping, datacard: Mapping,
                plots: Mapping[str, bytes | None], sequence_length: Mapping | None = None,
                extra: Mapping[str, tuple[str, str]] | None = None, adaptation: Mapping | None = None,
                selection: Mapping | None = None) -> str:
    """One self-contained page with every section of SECTIONS, in that order, then `extra`
    ({id: (title, html)}: optional stages' sections, e.g. the curve, when they ran)."""
    proposed = transfer["proposed"]
    parts: dict[str, str] = {"summary": _summary(transfer, gate, bias, robustness)}
    level = f"{round(100 * transfer.get('confidence', 0.95))}%"
    parts["candidates"] = _table(
        ["candidate", "role", "test accuracy", f"accuracy {level} interval", "test macro-F1", f"macro-F1 {level} interval"],
        [[n, c["role"], c["test"]["accuracy"], _interval(c["test"]["accuracy_ci"]),
          c["test"]["macro_f1"], _interval(c["test"]["macro_f1_ci"])]
         for n, c in transfer["candidates"].items()]) + _img(plots.get("candidates"), "candidates") + _seeds(transfer)
    parts["adaptation"] = _adaptation_section(adaptation or {}, level)
    parts["backbone"] = _backbone(selection)
    parts["confusion"] = _img(plots.get("confusion"), "confusion matrix")
    if bias.get("groups"):
        rows = []
        for column, per_candidate in bias["groups"].items():
            for cand, g in per_candidate.items():
                rows += [[column, cand, metric, gap, *_direction_cells(g.get("gap_direction", {}).get(metric)),
                          _interval(g["gap_ci"][metric]) if metric in g["gap_ci"] else None]
                         for metric, gap in g["gaps"].items()]
        parts["groups"] = _table(["column", "candidate", "metric", "largest gap", "lower group", "higher group",
                                  f"gap {level} interval"], rows) + _img(plots.get("groups"), "per-group accuracy")
    else:
        parts["groups"] = "<p>The data has no group columns (<code>data.group_columns</code>); no per-group metrics.</p>"
    cf = bias["counterfactual"]
    rows = [[axis, *[cf[c]["axes"].get(axis, {}).get("flip_rate") for c in cf],
             *[cf[c]["axes"].get(axis, {}).get("mean_tv") for c in cf]]
            for axis in sorted({a for c in cf.values() for a in c["axes"]})]
    directions = cf.get(proposed, {}).get("directions", [])
    per_direction = _table(
        ["axis", "swap", "texts", "flip rate", "mean TV", "class moved most", "mean change of its probability"],
        [[d["axis"], d["direction"], d["n"], d["flip_rate"], d["mean_tv"],
          *((d.get("largest_shift") or {}).get(k) for k in ("class", "change"))] for d in directions])
    parts["counterfactual"] = (
        f"<p>{html.escape(INHERITED_NOTE)}</p>"
        + _table(["axis", *[f"flip rate {c}" for c in cf], *[f"mean TV {c}" for c in cf]], rows)
        + _img(plots.get("counterfactual"), "counterfactual flip rates")
        + (_collapsed(f"{html_text(proposed)} per swap direction ({len(directions)} directions; a positive change means "
                      "the swapped-in group gets the higher probability)", per_direction) if directions else ""))
    tp = bias.get("templates") or {}
    if tp.get("candidates"):
        rows = []
        for c, per in tp["candidates"].items():
            for axis, r in per.items():
                d = r.get("max_gap_direction") or {}
                rows.append([axis, c, r["max_gap"], d.get("class"), d.get("lower"), d.get("higher"),
                             _interval(r["gap_ci"][d["class"]]) if d.get("class") in r["gap_ci"] else None])
        parts["templates"] = f"<p>Probe file: <code>{html_text(tp.get('file'))}</code></p>" + _table(
            ["axis", "candidate", "largest gap in mean probability", "class", "lower group", "higher group",
             f"gap {level} interval (templates resampled)"], rows)
    else:
        parts["templates"] = "<p>No template probes configured (<code>evaluate.template_probes</code>).</p>"
    rows = [[axis, group, g["texts"], json.dumps(g["per_label"], ensure_ascii=False), ", ".join(g["absent_terms"][:12])]
            for axis, groups in bias.get("cooccurrence", {}).items() for group, g in groups.items()]
    parts["cooccurrence"] = _table(["axis", "group", "train texts", "per label", "terms absent from training"], rows)
    rob = robustness["candidates"]
    kinds = sorted({k for c in rob.values() for k in c["perturbations"]})
    parts["robustness"] = _table(["perturbation", *[f"flip rate {c}" for c in rob]],
                                 [[k, *[rob[c]["perturbations"][k]["flip_rate"] for c in rob]] for k in kinds]) + _img(
        plots.get("robustness"), "robustness flip rates")
    parts["gate"] = _table(["check", "value", "threshold", "passed"],
                           [[c["name"], c["value"], c["threshold"], "yes" if c["passed"] else "NO"] for c in gate["checks"]])
    parts["datacard"] = f"<pre>{html_text(json.dumps(datacard, indent=2, ensure_ascii=False))}</pre>"
    parts["sequence_length"] = _sequence_length_section(sequence_length, plots.get("token_lengths"))
    parts["examples"] = _examples_section(proposed, directions, rob.get(proposed, {}).get("perturbations", {}))
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{parts[sid]}</section>'
                   for sid, title in SECTIONS.items())
    body += "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{part}</section>'
                    for sid, (title, part) in (extra or {}).items())
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
             "#summary{background:#f6f6f6;border:1px solid #ddd;padding:.2em 1em}"
             ".verdict{font-size:1.2em;font-weight:bold}.positive{color:#060}.negative{color:#a00}.no_gain{color:#a60}"
             ".gate{font-weight:bold}.gate.failed{color:#a00}.gate.passed{color:#060}"
             "summary{cursor:pointer;margin:.3em 0}img{max-width:100%}.examples{font-size:12px}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>graft evaluation report</title>"
            f"<style>{style}</style></head><body><h1>graft evaluation report</h1>{body}</body></html>\n")


def _sequence_length_section(facts: Mapping | None, png: bytes | None) -> str:
    """The train split's token lengths, the max_length used (given, or chosen by `auto`), what it
    truncates and what it costs against 128 (the features stage's reports/sequence_length.json)."""
    if not facts:
        return "<p>No sequence-length report (reports/sequence_length.json: run the features stage).</p>"
    q, ref, auto = facts["quantiles"], facts["reference"], facts.get("auto") or {}
    how = "chosen by <code>max_length: auto</code>" if facts.get("requested") == "auto" else "given in params.yaml"
    rule = (f"auto keeps {auto.get('coverage', 0):.0%} of train texts whole ({auto.get('covering_length')} tokens, "
            f"rounded up to a multiple of 8), capped at {auto.get('cap')} (the backbone's positions), lowered until the "
            f"mean tokens per text is at most {auto.get('budget_mean_tokens')}: it picks {auto.get('max_length')}, "
            f"decided by {auto.get('decided_by')}, at {auto.get('relative_cost', 0):.2f}x the cost of 128")
    return (f"<p>max_length <b>{facts['max_length']}</b> ({how}), truncation <code>{html_text(facts.get('truncation'))}"
            f"</code>. {html_text(rule)}.</p>"
            + _table(["max_length", "train texts truncated", "mean tokens per text", "cost vs 128"],
                     [[facts["max_length"], _pct(facts["truncated_share"]), facts["mean_tokens"], facts["relative_cost"]],
                      [ref["max_length"], _pct(ref["truncated_share"]), ref["mean_tokens"], 1.0]])
            + _table(["train texts", *q], [[facts["texts"], *q.values()]])
            + _img(png, "token lengths of the train split"))


def _adaptation_section(adaptation: Mapping, level: str) -> str:
    """Each adaptation method against the same strategy without adapting (reports/adaptation.json)."""
    methods = adaptation.get("methods", {})
    if not methods:
        return "<p>No domain adaptation (<code>adapt.methods</code> is empty).</p>"
    return _table(["candidate", "method", "against", "verdict", "margin (points)", f"margin {level} interval",
                   "McNemar p"],
                  [[n, m["method"], m["reference"], m["verdict"], m["margin_points"], _interval(m["margin_ci"]),
                    m["test"]["p_value"]] for n, m in methods.items()])


def _examples_section(proposed: str, directions: Sequence[Mapping], perturbations: Mapping[str, Mapping]) -> str:
    """The texts whose prediction moved most, per swap direction and per perturbation, each list
    collapsed: evidence to open, not to scroll past."""
    blocks = [_collapsed(f"counterfactual {html_text(d['axis'])} {html_text(d['direction'])}: {len(d['examples'])} of "
                         f"{d['n']} texts (flip rate {_pct(d['flip_rate'])})", _examples(d["examples"], "swapped"))
              for d in directions if d["examples"]]
    blocks += [_collapsed(f"robustness {html_text(k)}: {len(p['examples'])} of {p['n']} texts (flip rate "
                          f"{_pct(p['flip_rate'])})", _examples(p["examples"], "perturbed"))
               for k, p in sorted(perturbations.items()) if p["examples"]]
    if not blocks:
        return "<p>No prediction of the proposed model moved under any swap or perturbation.</p>"
    return f"<p>The texts whose prediction by {html_text(proposed)} moved most (largest total-variation change).</p>" + "".join(blocks)


def summary_markdown(transfer: Mapping, gate: Mapping, bias: Mapping, robustness: Mapping) -> str:
    """A few lines for a Prefect markdown artifact: verdict, top findings, candidates, flip rates, gate."""
    lines = [f"**{verdict_sentence(transfer, transfer['proposed'])}**", "",
             *(f"- {f}" for f in findings(transfer, bias, robustness)), "",
             f"| candidate | test accuracy | {round(100 * transfer.get('confidence', 0.95))}% interval |", "| --- | --- | --- |"]
    for name, c in transfer["candidates"].items():
        low, high = c["test"]["accuracy_ci"]
        lines.append(f"| {name} | {c['test']['accuracy']:.4f} | [{low:.4f}, {high:.4f}] |")
    lines += ["", "| candidate | max counterfactual flip rate | max robustness flip rate |", "| --- | --- | --- |"]
    for name, c in bias["counterfactual"].items():
        rob = robustness["candidates"].get(name, {}).get("max_flip_rate")
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(c['max_flip_rate'])} | {fmt(rob)} |")
    failed = [c["name"] for c in gate["checks"] if not c["passed"]]
    lines += ["", "Gate: **passed**" if gate["passed"] else f"Gate: **failed** ({', '.join(failed)})"]
    return "\n".join(lines) + "\n"


def gate_failure_message(gate: Mapping) -> str | None:
    """The one line a failed gate stops registration with, naming every failed check; None if passed."""
    if gate["passed"]:
        return None
    failed = [f"{c['name']} ({c['value']} vs {c['threshold']})" for c in gate["checks"] if not c["passed"]]
    return "gate failed, not registering: " + "; ".join(failed)
