"""What `model.max_length: auto` picks on a data set, its cost against 128, and the `partial`
strategy's validation accuracy at 128 and at auto's length, with head and head_tail truncation.

The splits are graft's own (the prepare stage's function, params.yaml's seed and sizes unless
given); the length is chosen on the train split only; every run uses params.yaml's `partial`
settings (lr, epochs, patience, freeze_layers, batch size) and the default backbone.

    python benchmarks/sequence_length.py --source /work/shared/data/reviews/kitchen.csv \
        --train 250 --val 250
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from graft import config
from graft.files import read_json
from graft.layout import Layout
from graft.lengths import backbone_cap, resolve_max_length, token_lengths
from graft.modeling import (
    build_classifier,
    load_encoder,
    load_tokenizer,
    seed_everything,
    select_device,
)
from graft.pins import write_sources
from graft.training import FitSettings, fit, prepare_strategy
from tasks.fetch import fetch
from tasks.prepare import prepare
from tasks.select import select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--train", type=int, default=None)
    parser.add_argument("--val", type=int, default=None)
    parser.add_argument("--truncations", default="head,head_tail")
    parser.add_argument("--lengths-only", action="store_true", help="report the choice and its cost; train nothing")
    a = parser.parse_args()
    raw = config.load().model_dump()
    raw["data"].update(source=a.source, test_size=None, group_columns=[], domain_column=None)
    raw["data"].update({k: v for k, v in (("train_size", a.train), ("val_size", a.val)) if v})
    params = config.validate(raw)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        write_sources(params, layout)
        prepare(params, source_file=layout.data_source_file, raw_dir=layout.raw_dir, out_dir=layout.prepared_dir,
                datacard_md=layout.datacard_md, plot=layout.plots_dir / "text_lengths.png")
        fetch(params, source_file=layout.model_source_file, out_dir=layout.candidates_dir)
        select(params, candidates_dir=layout.candidates_dir, prepared_dir=layout.prepared_dir,
               out_dir=layout.pretrained_dir, report=layout.transferability, plot=layout.transferability_plot)
        train, val = (pd.read_parquet(layout.split_file(s)) for s in ("train", "val"))
        tokenizer = load_tokenizer(layout.pretrained_dir)
        m = params.model
        cap = backbone_cap(load_encoder(layout.pretrained_dir).config, tokenizer)
        auto, facts = resolve_max_length("auto", token_lengths(tokenizer, train["text"].tolist()),
                                         coverage=m.length_coverage, budget=m.length_budget, cap=cap)
        print(json.dumps({"source": a.source, "train": len(train), "val": len(val), "auto": auto,  # noqa: T201
                          **{k: facts[k] for k in ("quantiles", "truncated_share", "mean_tokens", "reference",
                                                   "relative_cost", "rule")}}), flush=True)
        if a.lengths_only:
            return
        t, device, classes = params.train, select_device(), read_json(layout.datacard)["classes"]
        # 128 head (the default) and auto's length first, then the other truncations
        truncations = a.truncations.split(",")
        runs = list(dict.fromkeys([(128, truncations[0]), (auto, truncations[0]),
                                   *((length, other) for other in truncations[1:] for length in (auto, 128))]))
        for max_length, truncation in runs:
            seed_everything(params.seed)
            model = build_classifier(layout.pretrained_dir, classes=classes, name="partial")
            model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=t.freeze_layers, lr=t.lr,
                                                     weight_decay=t.weight_decay)
            settings = FitSettings(lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, weight_decay=t.weight_decay,
                                   warmup_ratio=t.warmup_ratio, grad_accumulation=t.grad_accumulation,
                                   max_length=max_length, truncation=truncation, seed=params.seed,
                                   patience=t.patience, cache_frozen=t.cache_frozen, precision=t.precision)
            started = time.perf_counter()
            result = fit(model, tokenizer, train_texts=train["text"].tolist(), train_labels=train["label_id"].to_numpy(),
                         val_texts=val["text"].tolist(), val_labels=val["label_id"].to_numpy(), settings=settings,
                         param_groups=groups, device=device, freeze_layers=frozen, desc=f"{max_length}/{truncation}")
            print(json.dumps({"max_length": max_length, "truncation": truncation,  # noqa: T201
                              "best_val_accuracy": result["best_val_accuracy"], "best_epoch": result["best_epoch"],
                              "seconds": round(time.perf_counter() - started, 1), "device": device.type}), flush=True)


if __name__ == "__main__":
    main()
