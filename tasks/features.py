"""features: embed every split with the frozen backbone (mean pooling, last layer)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from graft import config
from graft.errors import exits_cleanly
from graft.files import atomic_path
from graft.layout import SPLITS, Layout, require
from graft.modeling import embed, load_encoder, load_tokenizer, select_device
from graft.transferability import logme


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> float:
    """Validation accuracy of a logistic-regression probe on frozen features."""
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    return float((probe.predict(val_x) == val_y).mean())


def features(params: config.Params, *, pretrained_dir: Path, prepared_dir: Path, out_dir: Path) -> dict:
    """Embed train/val/test with the chosen backbone's last layer and write one .npy per split
    (the per-layer, per-candidate scores are the select stage's)."""
    splits = {split: prepared_dir / f"{split}.parquet" for split in SPLITS}
    require(pretrained_dir / "config.json", *splits.values())
    device = select_device()
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(pretrained_dir, trust_remote_code=trust)
    encoder = load_encoder(pretrained_dir, trust_remote_code=trust)
    started = time.perf_counter()
    embedded, labels = {}, {}
    for split, path in splits.items():
        frame = pd.read_parquet(path, columns=["text", "label_id"])
        embedded[split] = embed(
            encoder, tokenizer, frame["text"].tolist(), max_length=params.model.max_length,
            batch_size=params.features.batch_size, device=device, desc=f"embed {split}",
        )
        labels[split] = frame["label_id"].to_numpy()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split, matrix in embedded.items():
            np.save(tmp / f"{split}.npy", matrix)
    result = {
        "backbone": str(pretrained_dir),
        "pooling": "mean",
        "logme": logme(embedded["train"], labels["train"]),
        "probe_val_accuracy": probe_accuracy(embedded["train"], labels["train"], embedded["val"], labels["val"], params.seed),
        "dims": int(embedded["train"].shape[1]),
        "rows": {split: int(m.shape[0]) for split, m in embedded.items()},
    }
    return {**result, "seconds": round(time.perf_counter() - started, 2), "device": device.type}


@exits_cleanly
def main() -> None:
    layout = Layout()
    result = features(config.load(), pretrained_dir=layout.pretrained_dir, prepared_dir=layout.prepared_dir,
                      out_dir=layout.features_dir)
    print(  # noqa: T201
        f"features: {sum(result['rows'].values())} texts embedded in {result['seconds']}s; "
        f"LogME {result['logme']:.3f}, frozen probe val accuracy {result['probe_val_accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
