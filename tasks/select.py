"""select: score every candidate backbone per layer on frozen train/val features (LogME,
H-score, k-NN), rank them, and copy the chosen one into models/pretrained/ (THE backbone).

Rule: candidates rank by LogME on their layer-averaged features (a LogME value ranks backbones
on one data set; alone it means nothing). model.select auto takes the best-ranked one whose
estimated fine-tuning seconds fit train.budget_seconds: forward seconds per train row measured
while scoring x train rows x the most epochs of a fine-tuned strategy x BACKWARD_FACTOR.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, read_json, write_json
from graft.layout import Layout, require
from graft.lengths import for_backbone
from graft.modeling import embed_layers, load_encoder, load_tokenizer, select_device
from graft.transferability import (
    RANK_LAYER,
    RANK_SCORE,
    freeze_depth,
    rank_candidates,
    score_layers,
)

# a training step costs about three forward passes (the backward pass is about two)
BACKWARD_FACTOR = 3.0
RULE = (f"rank by {RANK_SCORE} on the {RANK_LAYER} of the layers' mean-pooled features; freeze_layers auto: "
        "every block up to the best-scoring layer, at most layers - 1")


def finetune_epochs(train: config.TrainParams) -> int:
    """The most epochs any fine-tuned strategy runs (linear_probe trains no backbone), in passes
    over the train rows: a setfit epoch reads 4 x num_iterations texts per row (2 x num_iterations
    pairs of two texts)."""
    epochs = {"partial": train.epochs, "full": train.full.epochs, "lora": train.lora.epochs,
              "setfit": train.setfit.epochs * 4 * train.setfit.num_iterations}
    return max([epochs[s] for s in train.strategies if s in epochs] or [0])


def score_candidate(model_dir: Path, texts: dict, labels: dict, params: config.Params, device) -> dict:
    """Every layer's scores of one backbone, its forward seconds and its estimated fine-tuning seconds."""
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust)
    encoder = load_encoder(model_dir, trust_remote_code=trust)
    # each candidate is scored at the length it would get (`auto` resolved with its own tokenizer
    # and positions), cut as model.truncation says: what features does for the chosen one
    tokens, _ = for_backbone(params.model, tokenizer, encoder.config, texts["train"])
    started = time.perf_counter()
    layers = {split: embed_layers(encoder, tokenizer, texts[split], max_length=tokens.max_length,
                                  truncation=tokens.truncation, batch_size=params.features.batch_size,
                                  device=device, desc=f"layers {split}")
              for split in ("train", "val")}
    forward = time.perf_counter() - started
    started = time.perf_counter()
    scores = score_layers(layers["train"], labels["train"], layers["val"], labels["val"])
    rows = len(texts["train"]) + len(texts["val"])
    estimate = forward / rows * len(texts["train"]) * finetune_epochs(params.train) * BACKWARD_FACTOR
    return {"layers": scores, "max_length": tokens.max_length, "forward_seconds": round(forward, 3),
            "scoring_seconds": round(time.perf_counter() - started, 3),
            "estimated_finetune_seconds": round(estimate, 1)}


def choose(ranked: list[str], scored: dict, *, select: str, budget: float | None, first: str) -> tuple[str, list[dict]]:
    """The chosen candidate, and every other one with why it was skipped."""
    if select == "ref":
        return first, [{"candidate": n, "reason": "model.select is ref"} for n in ranked if n != first]
    skipped, chosen = [], None
    for name in ranked:
        estimate = scored[name]["estimated_finetune_seconds"]
        if chosen is not None:
            skipped.append({"candidate": name, "reason": f"ranked below {chosen}"})
        elif budget is not None and estimate > budget:
            skipped.append({"candidate": name, "reason": f"estimated fine-tuning {estimate:.0f}s exceeds "
                                                         f"train.budget_seconds {budget:g}s"})
        else:
            chosen = name
    if chosen is None:
        estimates = ", ".join(f"{n} {scored[n]['estimated_finetune_seconds']:.0f}s" for n in ranked)
        raise GraftError(f"params.yaml: train.budget_seconds={budget:g}: no candidate fits (estimated fine-tuning: "
                         f"{estimates})")
    return chosen, skipped


def plot_scores(scored: dict, path: Path) -> None:
    """One panel per score: the score of each layer per candidate, the layer average dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("logme", "hscore", "knn_val_accuracy")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, score in zip(axes, names, strict=True):
        for i, (candidate, result) in enumerate(scored.items()):
            layers = sorted(int(k) for k in result["layers"] if k.isdigit())
            line, = ax.plot(layers, [result["layers"][str(k)][score]["value"] for k in layers], marker="o",
                            label=candidate, color=f"C{i}")
            ax.axhline(result["layers"][RANK_LAYER][score]["value"], color=line.get_color(), linestyle="--", lw=1)
        ax.set_title(score)
        ax.set_xlabel("layer (0: embeddings)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def select(params: config.Params, *, candidates_dir: Path, prepared_dir: Path, out_dir: Path, report: Path,
           plot: Path) -> dict:
    """Score, rank and choose; copy the chosen backbone into `out_dir` with the selection in its manifest."""
    require(candidates_dir / "index.json", prepared_dir / "train.parquet", prepared_dir / "val.parquet")
    index = read_json(candidates_dir / "index.json")["candidates"]
    texts, labels = {}, {}
    for split in ("train", "val"):
        frame = pd.read_parquet(prepared_dir / f"{split}.parquet", columns=["text", "label_id"])
        texts[split], labels[split] = frame["text"].tolist(), frame["label_id"].to_numpy()
    device = select_device()
    scored = {e["folder"]: score_candidate(candidates_dir / e["folder"], texts, labels, params, device) for e in index}
    ranked = rank_candidates({name: s["layers"] for name, s in scored.items()})
    chosen, skipped = choose(ranked, scored, select=params.model.select, budget=params.train.budget_seconds,
                             first=index[0]["folder"])
    freeze = freeze_depth(scored[chosen]["layers"])
    refs = {e["folder"]: e["ref"] for e in index}
    # deterministic: what train and evaluate read (no seconds: a budget choice says only that it was one)
    selection = {
        "rule": RULE, "select": params.model.select, "chosen": chosen, "ref": refs[chosen],
        "ranked": [{"candidate": n, "ref": refs[n], **{s: v["value"] for s, v in scored[n]["layers"][RANK_LAYER].items()}}
                   for n in ranked],
        "skipped": [{"candidate": s["candidate"], "reason": "over train.budget_seconds" if "budget" in s["reason"]
                     else s["reason"]} for s in skipped],
        "layer_logme": {k: v["logme"]["value"] for k, v in scored[chosen]["layers"].items()},
        "freeze_layers_auto": freeze,
    }
    with atomic_path(out_dir) as tmp:
        shutil.copytree(candidates_dir / chosen, tmp)
        manifest = read_json(tmp / "manifest.json")
        write_json(tmp / "manifest.json", {**manifest, "selection": selection})
    result = {"rule": RULE, "chosen": chosen, "ranked": ranked, "skipped": skipped, "freeze_layers_auto": freeze,
              "requested_max_length": params.model.max_length, "rows": {s: len(t) for s, t in texts.items()},
              "candidates": {n: {"ref": refs[n], "rank": ranked.index(n) + 1, **scored[n]} for n in scored}}
    write_json(report, result)
    plot_scores(scored, plot)
    return result


@exits_cleanly
def main() -> None:
    layout = Layout()
    result = select(config.load(), candidates_dir=layout.candidates_dir, prepared_dir=layout.prepared_dir,
                    out_dir=layout.pretrained_dir, report=layout.transferability, plot=layout.transferability_plot)
    for name in result["ranked"]:
        c = result["candidates"][name]
        avg = c["layers"][RANK_LAYER]
        print(  # noqa: T201
            f"select: #{c['rank']} {c['ref']}: LogME {avg['logme']['value']:.3f}, H-score {avg['hscore']['value']:.2f}, "
            f"k-NN val {avg['knn_val_accuracy']['value']:.3f} (layer average); forward {c['forward_seconds']}s, "
            f"fine-tuning ~{c['estimated_finetune_seconds']:.0f}s"
        )
    for s in result["skipped"]:
        print(f"select: skipped {s['candidate']}: {s['reason']}")  # noqa: T201
    print(f"select: chose {result['chosen']}; freeze_layers auto would freeze {result['freeze_layers_auto']}")  # noqa: T201


if __name__ == "__main__":
    main()
