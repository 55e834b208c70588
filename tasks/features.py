"""features: resolve `model.max_length` (auto: from the train split's token lengths) and
`model.inference` (auto: measured on validation, graft.inference), embed every split with the
chosen backbone's last layer (mean pooling) at that length in that mode."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from graft import config, precision
from graft.errors import exits_cleanly
from graft.files import atomic_path, write_json
from graft.inference import choose
from graft.layout import RECIPE_FILE, SPLITS, Layout, require
from graft.lengths import for_backbone, recipe, summary_line, token_lengths_png
from graft.modeling import embed, load_encoder, load_tokenizer, select_device


def features(params: config.Params, *, pretrained_dir: Path, prepared_dir: Path, out_dir: Path,
             length_report: Path, length_plot: Path, inference_report: Path) -> dict:
    """Resolve the sequence length, embed train/val/test (and the unlabelled texts, when prepare
    wrote them) and write one .npy per split, the recipe (the length and truncation used) and the
    sequence-length report (the per-layer, per-candidate scores are the select stage's)."""
    splits = {split: prepared_dir / f"{split}.parquet" for split in SPLITS}
    require(pretrained_dir / "config.json", *splits.values())
    device = select_device()
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(pretrained_dir, trust_remote_code=trust)
    encoder = load_encoder(pretrained_dir, trust_remote_code=trust)
    started = time.perf_counter()
    frames = {split: pd.read_parquet(path, columns=["text", "label_id"]) for split, path in splits.items()}
    tokenization, length_facts = for_backbone(params.model, tokenizer, encoder.config, frames["train"]["text"].tolist())
    texts = {split: frame["text"].tolist() for split, frame in frames.items()}
    unlabelled = prepared_dir / "unlabelled.parquet"
    if unlabelled.exists():  # prepare wrote it: data.unlabelled_source is set (self-training reads these)
        texts["unlabelled"] = pd.read_parquet(unlabelled, columns=["text"])["text"].tolist()

    def embed_in(batch, mode: str, desc: str = "inference check") -> np.ndarray:
        return embed(encoder if mode != "int8" else quantized(), tokenizer, batch, max_length=tokenization.max_length,
                     truncation=tokenization.truncation, batch_size=params.features.batch_size, device=device,
                     desc=desc, inference=mode)

    int8_model: list = []

    def quantized():  # quantized once, when a check or the chosen mode needs it
        if not int8_model:
            int8_model.append(precision.prepare(encoder, "int8"))
        return int8_model[0]

    mode, inference_facts = choose(params.model.inference, device, embed=embed_in, train_texts=texts["train"],
                                   train_y=frames["train"]["label_id"].to_numpy(), val_texts=texts["val"],
                                   val_y=frames["val"]["label_id"].to_numpy(),
                                   workload=sum(len(batch) for batch in texts.values()))
    embedded = {split: embed_in(batch, mode, f"embed {split}") for split, batch in texts.items()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split, matrix in embedded.items():
            np.save(tmp / f"{split}.npy", matrix)
        write_json(tmp / RECIPE_FILE, recipe(dataclasses.replace(tokenization, inference=mode),
                                             requested=params.model.max_length,
                                             inference_requested=params.model.inference))
    write_json(length_report, length_facts)
    write_json(inference_report, inference_facts)
    with atomic_path(length_plot) as tmp:
        tmp.write_bytes(token_lengths_png(length_facts))
    return {"backbone": str(pretrained_dir), "pooling": "mean", "dims": int(embedded["train"].shape[1]),
            "rows": {split: int(m.shape[0]) for split, m in embedded.items()}, "max_length": tokenization.max_length,
            "seconds": round(time.perf_counter() - started, 2), "device": device.type,
            "sequence_length": length_facts, "inference": inference_facts}


@exits_cleanly
def main() -> None:
    layout = Layout()
    result = features(config.load(), pretrained_dir=layout.pretrained_dir, prepared_dir=layout.prepared_dir,
                      out_dir=layout.features_dir, length_report=layout.sequence_length,
                      length_plot=layout.token_lengths_plot, inference_report=layout.inference_report)
    print(f"features: {summary_line(result['sequence_length'])}")  # noqa: T201
    facts = result["inference"]
    print(f"features: inference {facts['chosen']} ({facts['requested']}: {facts['why']})")  # noqa: T201
    print(f"features: {sum(result['rows'].values())} texts embedded in {result['seconds']}s")  # noqa: T201


if __name__ == "__main__":
    main()
