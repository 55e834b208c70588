"""The `setfit` strategy as a graft candidate (issue 15, point 3): graft's own stages on one data set
with `train.strategies: [linear_probe, partial, setfit]`, then setfit's `num_iterations` grid scored
on validation (the default is chosen there, never on test), then evaluate's test accuracies.

1. a workspace in <out>/ws: params.yaml with data.source = --data, --train / --val / --test rows,
   seed --seed, model.max_length --max-length, the three strategies; prepare, fetch, select,
   features and train run through their entry points (benchmarks/stages.py);
2. for each --iterations value other than params.yaml's: train_setfit (the train stage's own
   function) again in <out>/grid/<n>: validation accuracy and seconds;
3. with --evaluate: the evaluate stage; every candidate's test accuracy and interval from
   reports/transfer.json.

Writes <out>/setfit_strategy.json (and prints a table). CPU or GPU, whatever torch finds.

    python benchmarks/setfit_strategy.py --out /tmp/setfit_strategy \\
        --data ../shared/data/reviews/kitchen.csv --iterations 2 5 10 --evaluate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from stages import inside, run_stages  # benchmarks/stages.py (the script's folder is on sys.path)

from graft import config
from graft.files import read_json, write_json
from graft.layout import Layout
from graft.lengths import resolved_tokenization
from graft.modeling import select_device
from tasks.train import train_setfit

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ["linear_probe", "partial", "setfit"]


def workspace(out: Path, args) -> Path:
    root = out / "ws"
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seed"] = args.seed
    raw["data"].update(source=str(Path(args.data).resolve()), train_size=args.train, val_size=args.val,
                       test_size=args.test or None)
    raw["model"]["max_length"] = args.max_length
    raw["train"]["strategies"] = STRATEGIES
    # evaluate's probe files are named relative to the repository, which the workspace is not
    for key in ("identity_terms", "template_probes"):
        if raw["evaluate"][key]:
            raw["evaluate"][key] = str(REPO / raw["evaluate"][key])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def grid_point(root: Path, params: config.Params, n: int, out: Path) -> dict:
    """train_setfit with num_iterations n, saved under out/grid/<n>: val accuracy and seconds."""
    setfit = params.train.setfit.model_copy(update={"num_iterations": n})
    params = params.model_copy(update={"train": params.train.model_copy(update={"setfit": setfit})})
    layout = Layout(root)
    train_df, val_df = pd.read_parquet(layout.split_file("train")), pd.read_parquet(layout.split_file("val"))
    data = {"train_texts": train_df["text"].tolist(), "train_labels": train_df["label_id"].to_numpy(),
            "val_texts": val_df["text"].tolist(), "val_labels": val_df["label_id"].to_numpy()}
    with inside(root):
        state, _ = train_setfit(params, classes=read_json(layout.datacard)["classes"], data=data, layout=layout,
                                tokens=resolved_tokenization(params, layout), out_dir=out / "grid" / str(n),
                                device=select_device())
    return {"num_iterations": n, "val_accuracy": state["best_val_accuracy"], "seconds": state["seconds"],
            "body_seconds": state["body_seconds"], "C": state["C"], "pairs_per_epoch": state["setfit"]["pairs_per_epoch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", required=True, help="a CSV with text,label columns (and id)")
    ap.add_argument("--train", type=int, default=250)
    ap.add_argument("--val", type=int, default=250)
    ap.add_argument("--test", type=int, default=0, help="test rows; 0: every row left (data.test_size null)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--iterations", type=int, nargs="*", default=[], help="setfit num_iterations scored on val")
    ap.add_argument("--evaluate", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    summary_path = a.out / "setfit_strategy.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["settings"] = {k: str(v) for k, v in vars(a).items()}
    root = workspace(a.out, a)
    if "stages" not in summary:
        # a rerun after a failed train keeps the earlier stages' outputs (same params, same data)
        done = (root / "data/features/train.npy").exists()
        summary["stages"] = run_stages(root, ("train",) if done else ("prepare", "fetch", "select", "features", "train"))
        report = read_json(root / "reports/train.json")
        summary["train"] = {name: {k: c.get(k) for k in ("best_val_accuracy", "seconds", "body_seconds", "C")}
                            for name, c in report["candidates"].items()}
        summary["proposed"] = report["proposed"]
        write_json(summary_path, summary)
    params = config.load(root / "params.yaml")
    if a.evaluate and "test" not in summary:
        summary["stages"]["evaluate"] = run_stages(root, ("evaluate",))["evaluate"]
        transfer = read_json(root / "reports/transfer.json")
        summary["test"] = {name: {"accuracy": c["test"]["accuracy"], "accuracy_ci": c["test"].get("accuracy_ci")}
                           for name, c in transfer["candidates"].items()}
        summary["verdict"] = transfer.get("verdict")
        write_json(summary_path, summary)
    grid = {int(g["num_iterations"]): g for g in summary.get("grid", [])}
    grid.setdefault(params.train.setfit.num_iterations, {
        "num_iterations": params.train.setfit.num_iterations, "val_accuracy": summary["train"]["setfit"]["best_val_accuracy"],
        "seconds": summary["train"]["setfit"]["seconds"], "body_seconds": summary["train"]["setfit"]["body_seconds"],
        "C": summary["train"]["setfit"]["C"], "pairs_per_epoch": 2 * params.train.setfit.num_iterations * a.train})
    for n in a.iterations:
        if n not in grid:
            started = time.perf_counter()
            grid[n] = grid_point(root, params, n, a.out)
            grid[n]["wall_seconds"] = round(time.perf_counter() - started, 1)
            summary["grid"] = [grid[k] for k in sorted(grid)]
            write_json(summary_path, summary)
    summary["grid"] = [grid[k] for k in sorted(grid)]
    write_json(summary_path, summary)
    for name, c in summary["train"].items():
        test = summary.get("test", {}).get(name, {})
        ci = test.get("accuracy_ci")
        print(f"{name}: val {c['best_val_accuracy']:.4f}, train {c['seconds']}s"  # noqa: T201
              + (f", test {test['accuracy']:.4f} {np.round(ci, 4).tolist() if ci else ''}" if test else ""))
    for g in summary["grid"]:
        print(f"setfit num_iterations {g['num_iterations']}: val {g['val_accuracy']:.4f}, {g['seconds']}s")  # noqa: T201


if __name__ == "__main__":
    main()
