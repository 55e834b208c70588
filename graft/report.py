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

# Every section of the page, in order; tests check each id is in the rendered DOM.
SECTIONS = {
    "verdict": "Verdict",
    "candidates": "Candidates",
    "confusion": "Confusion matrix",
    "groups": "Per-group metrics",
    "counterfactual": "Counterfactual probes",
    "templates": "Template probes",
    "cooccurrence": "Identity terms in the training data",
    "robustness": "Robustness",
    "gate": "Gate",
    "datacard": "Data card",
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


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return "<p><em>no plot: nothing to show</em></p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape("—" if v is None else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _examples(items: Sequence[Mapping], key: str) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{html.escape(e['text'][:200])} → <b>{html.escape(e[key][:200])}</b> "
                  f"({html.escape(str(e['before']))} → {html.escape(str(e['after']))}, TV {e['tv']:.3f})</li>"
                  for e in items)
    return f"<ul class=examples>{lis}</ul>"


def render_html(*, transfer: Mapping, gate: Mapping, bias: Mapping, robustness: Mapping, datacard: Mapping,
                plots: Mapping[str, bytes | None]) -> str:
    """One self-contained page with every section of SECTIONS."""
    verdict = transfer["verdict"]
    parts: dict[str, str] = {}
    gate_words = "passed" if gate["passed"] else "failed: " + ", ".join(
        c["name"] for c in gate["checks"] if not c["passed"])
    parts["verdict"] = (f"<p class='verdict {html.escape(verdict)}'>{html.escape(verdict_sentence(transfer, transfer['proposed']))}</p>"
                        f"<p>Gate {html.escape(gate_words)}.</p>")
    level = f"{round(100 * transfer.get('confidence', 0.95))}%"
    parts["candidates"] = _table(
        ["candidate", "role", "test accuracy", f"accuracy {level} interval", "test macro-F1", f"macro-F1 {level} interval"],
        [[n, c["role"], c["test"]["accuracy"], "[{:.3f}, {:.3f}]".format(*c["test"]["accuracy_ci"]),
          c["test"]["macro_f1"], "[{:.3f}, {:.3f}]".format(*c["test"]["macro_f1_ci"])]
         for n, c in transfer["candidates"].items()]) + _img(plots.get("candidates"), "candidates")
    parts["confusion"] = _img(plots.get("confusion"), "confusion matrix")
    if bias.get("groups"):
        rows = []
        for column, per_candidate in bias["groups"].items():
            for cand, g in per_candidate.items():
                rows += [[column, cand, metric, gap, "[{:.3f}, {:.3f}]".format(*g["gap_ci"][metric])
                          if metric in g["gap_ci"] else None] for metric, gap in g["gaps"].items()]
        parts["groups"] = _table(["column", "candidate", "metric", "largest gap", f"gap {level} interval"], rows) + _img(
            plots.get("groups"), "per-group accuracy")
    else:
        parts["groups"] = "<p>The data has no group columns (<code>data.group_columns</code>); no per-group metrics.</p>"
    cf = bias["counterfactual"]
    rows = [[axis, *[cf[c]["axes"].get(axis, {}).get("flip_rate") for c in cf],
             *[cf[c]["axes"].get(axis, {}).get("mean_tv") for c in cf]]
            for axis in sorted({a for c in cf.values() for a in c["axes"]})]
    examples = "".join(f"<h3>{html.escape(c)}: {html.escape(d['axis'])} {html.escape(d['direction'])}</h3>"
                       + _examples(d["examples"], "swapped")
                       for c in cf for d in cf[c]["directions"] if d["examples"] and c == transfer["proposed"])
    parts["counterfactual"] = (f"<p>{html.escape(INHERITED_NOTE)}</p>"
                               + _table(["axis", *[f"flip rate {c}" for c in cf], *[f"mean TV {c}" for c in cf]], rows)
                               + _img(plots.get("counterfactual"), "counterfactual flip rates") + examples)
    tp = bias.get("templates") or {}
    if tp.get("candidates"):
        rows = [[axis, c, r["max_gap"], json.dumps({k: [round(x, 3) for x in v] for k, v in r["gap_ci"].items()})]
                for c, per in tp["candidates"].items() for axis, r in per.items()]
        parts["templates"] = f"<p>Probe file: <code>{html.escape(str(tp.get('file')))}</code></p>" + _table(
            ["axis", "candidate", "largest gap in mean probability", f"gap {level} interval per class (templates resampled)"], rows)
    else:
        parts["templates"] = "<p>No template probes configured (<code>evaluate.template_probes</code>).</p>"
    rows = [[axis, group, g["texts"], json.dumps(g["per_label"]), ", ".join(g["absent_terms"][:12])]
            for axis, groups in bias.get("cooccurrence", {}).items() for group, g in groups.items()]
    parts["cooccurrence"] = _table(["axis", "group", "train texts", "per label", "terms absent from training"], rows)
    rob = robustness["candidates"]
    kinds = sorted({k for c in rob.values() for k in c["perturbations"]})
    parts["robustness"] = _table(["perturbation", *[f"flip rate {c}" for c in rob]],
                                 [[k, *[rob[c]["perturbations"][k]["flip_rate"] for c in rob]] for k in kinds]) + _img(
        plots.get("robustness"), "robustness flip rates") + "".join(
        f"<h3>{html.escape(k)}</h3>" + _examples(rob[transfer["proposed"]]["perturbations"][k]["examples"], "perturbed")
        for k in kinds if transfer["proposed"] in rob)
    parts["gate"] = _table(["check", "value", "threshold", "passed"],
                           [[c["name"], c["value"], c["threshold"], "yes" if c["passed"] else "NO"] for c in gate["checks"]])
    parts["datacard"] = f"<pre>{html.escape(json.dumps(datacard, indent=2))}</pre>"
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{parts[sid]}</section>'
                   for sid, title in SECTIONS.items())
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
             ".verdict{font-size:1.2em;font-weight:bold}.positive{color:#060}.negative{color:#a00}.no_gain{color:#a60}"
             "img{max-width:100%}.examples{font-size:12px}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>graft evaluation report</title>"
            f"<style>{style}</style></head><body><h1>graft evaluation report</h1>{body}</body></html>\n")


def summary_markdown(transfer: Mapping, gate: Mapping, bias: Mapping, robustness: Mapping) -> str:
    """A few lines for a Prefect markdown artifact: verdict, candidates, flip rates, gate."""
    lines = [f"**{verdict_sentence(transfer, transfer['proposed'])}**", "",
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
