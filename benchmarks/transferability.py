"""Per-layer transferability of several real backbones on one data set: prepare, fetch and
select by their functions in a throw-away folder, then the ranking, the seconds per candidate and
what freeze_layers auto picks. Real models: not part of the test suite.

    python benchmarks/transferability.py --data ../shared/data/reviews/kitchen.csv \
        --candidates models/backbones/all-mpnet-base-v2      # after `make mpnet`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from graft import config
from graft.layout import Layout
from graft.pins import write_sources
from graft.transferability import RANK_LAYER
from tasks.fetch import fetch
from tasks.prepare import prepare
from tasks.select import select

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--candidates", nargs="*", default=[])
    p.add_argument("--train-size", type=int, default=250)
    p.add_argument("--val-size", type=int, default=250)
    a = p.parse_args()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source=str(Path(a.data).resolve()), train_size=a.train_size, val_size=a.val_size)
    raw["model"]["candidates"] = [str(Path(c).resolve()) for c in a.candidates]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = config.load(root / "params.yaml")
        layout = Layout(root)
        write_sources(params, layout)
        prepare(params, source_file=layout.data_source_file, raw_dir=layout.raw_dir, out_dir=layout.prepared_dir,
                datacard_md=layout.datacard_md, plot=layout.plots_dir / "text_lengths.png")
        started = time.perf_counter()
        fetch(params, source_file=layout.model_source_file, out_dir=layout.candidates_dir)
        fetched = time.perf_counter() - started
        started = time.perf_counter()
        result = select(params, candidates_dir=layout.candidates_dir, prepared_dir=layout.prepared_dir,
                        out_dir=layout.pretrained_dir, report=layout.transferability, plot=layout.transferability_plot)
        selected = time.perf_counter() - started
    table = {}
    for name in result["ranked"]:
        c = result["candidates"][name]
        table[name] = {
            "rank": c["rank"], "forward_seconds": c["forward_seconds"], "scoring_seconds": c["scoring_seconds"],
            "estimated_finetune_seconds": c["estimated_finetune_seconds"],
            **{score: {layer: round(v[score]["value"], 4) for layer, v in c["layers"].items()}
               for score in ("logme", "hscore", "knn_val_accuracy")},
        }
    print(json.dumps({"chosen": result["chosen"], "ranked": result["ranked"], "rank_layer": RANK_LAYER,  # noqa: T201
                      "freeze_layers_auto": result["freeze_layers_auto"], "fetch_seconds": round(fetched, 1),
                      "select_seconds": round(selected, 1), "candidates": table}, indent=1))


if __name__ == "__main__":
    main()
