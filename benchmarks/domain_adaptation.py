"""Domain adaptation on the reviews data (issue 14): books labelled + kitchen unlabelled ->
kitchen test, source-only vs MLM-adapted vs self-trained, each with its verdict; and kitchen
with 64 labels per class, with and without adaptive pretraining. Real MiniLM (the default
backbone), CPU. Combined CSVs and workspaces go to a scratch folder outside the repository.

    python benchmarks/domain_adaptation.py --scratch /tmp/adapt-bench [--max-texts 1000 --mlm-epochs 1]

Prints one JSON line per scenario (test accuracy per candidate with intervals, each adaptation
verdict, the sizes used, seconds per stage).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import yaml
from stages import run_stages  # benchmarks/stages.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
REVIEWS = REPO.parent / "shared" / "data" / "reviews"


def scenarios(scratch: Path, test_rows: int, seed: int) -> dict[str, tuple[Path, Path, dict]]:
    """Two labelled CSVs with a split column (the same kitchen test rows in both) and the kitchen
    unlabelled CSV (texts only: every kitchen row outside the test rows)."""
    books, kitchen = pd.read_csv(REVIEWS / "books.csv"), pd.read_csv(REVIEWS / "kitchen.csv")
    kitchen = kitchen.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    test, rest = kitchen.iloc[:test_rows], kitchen.iloc[test_rows:]
    scratch.mkdir(parents=True, exist_ok=True)
    unlabelled = scratch / "kitchen_unlabelled.csv"
    rest[["id", "text"]].to_csv(unlabelled, index=False)
    books_sample = books.sample(n=500, random_state=seed)  # train 250 + val 250
    cross = pd.concat([books_sample.assign(split=["train"] * 250 + ["val"] * 250), test.assign(split="test")])
    cross.to_csv(scratch / "books_to_kitchen.csv", index=False)
    # 64 labels per class from the kitchen rows outside the test rows, 250 for validation
    per_class = [rest[rest["label"] == c].iloc[:64] for c in sorted(rest["label"].unique())]
    train = pd.concat(per_class)
    val = rest.drop(train.index).iloc[:250]
    small = pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test")])
    small.to_csv(scratch / "kitchen_64.csv", index=False)
    return {"books_to_kitchen": (scratch / "books_to_kitchen.csv", unlabelled, {"methods": ["mlm", "self_training"]}),
            "kitchen_64_per_class": (scratch / "kitchen_64.csv", unlabelled, {"methods": ["mlm", "self_training"]})}


def run_scenario(name: str, labelled: Path, unlabelled: Path, adapt: dict, *, scratch: Path, args) -> dict:
    from graft.layout import Layout

    root = scratch / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for item in ("dvc.yaml", "graft"):
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy2)(REPO / item, root / item)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(labelled), split_column="split", domain_column="domain",
                          unlabelled_source=str(unlabelled))
    params["model"]["max_length"] = args.max_length
    params["train"]["strategies"] = sorted({"linear_probe", args.strategy})
    params["train"]["scratch"]["epochs"] = args.scratch_epochs  # the transfer verdict's baseline, not measured here
    params["adapt"].update(strategy=args.strategy, **adapt)
    params["adapt"]["mlm"].update(max_texts=args.max_texts, epochs=args.mlm_epochs)
    params["evaluate"]["max_probe_texts"] = 50  # probes are not what is measured here
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    layout = Layout(root)
    seconds = run_stages(root, ("prepare", "fetch", "select", "features", "adapt", "train", "evaluate"))
    card = json.loads(layout.datacard.read_text())
    adapted = json.loads(layout.adapt_report.read_text())
    result = {"transfer": json.loads(layout.transfer.read_text()),
              "adaptation": json.loads(layout.adaptation.read_text())}
    candidates = {n: {"test_accuracy": c["test"]["accuracy"], "accuracy_ci": c["test"]["accuracy_ci"],
                      "val_accuracy": c.get("val", {}).get("accuracy")}
                  for n, c in result["transfer"]["candidates"].items()}
    train_report = json.loads(layout.train_report.read_text())
    st = json.loads((layout.finetuned_dir / "linear_probe_self_training" / "training.json").read_text())
    return {"scenario": name, "sizes": {k: v["rows"] for k, v in card["splits"].items()},
            "unlabelled": card["unlabelled"], "mlm": {k: adapted[k] for k in ("texts", "unlabelled_texts", "epochs",
                                                                                "epoch_loss", "note")},
            "self_training_chosen": st["chosen"], "self_training_grid": st["grid"],
            "proposed": train_report["proposed"], "candidates": candidates,
            "adaptation": {n: {k: m[k] for k in ("reference", "verdict", "margin_points", "margin_ci")} |
                           {"p_value": m["test"]["p_value"]} for n, m in result["adaptation"]["methods"].items()},
            "transfer_verdict": result["transfer"]["verdict"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder outside the repository")
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--max-texts", type=int, default=1000)
    parser.add_argument("--mlm-epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--strategy", default="partial", help="adapt.strategy (the MLM candidate's strategy)")
    parser.add_argument("--scratch-epochs", type=int, default=5)
    parser.add_argument("--only", default=None, help="run one scenario by name")
    args = parser.parse_args()
    if REPO.resolve() in args.scratch.resolve().parents:
        raise SystemExit("--scratch must be outside the repository")
    for name, (labelled, unlabelled, adapt) in scenarios(args.scratch, args.test_rows, seed=0).items():
        if args.only and name != args.only:
            continue
        print(json.dumps(run_scenario(name, labelled, unlabelled, adapt, scratch=args.scratch, args=args)),  # noqa: T201
              flush=True)


if __name__ == "__main__":
    main()
