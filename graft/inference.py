"""`model.inference`: which precision the forward passes run in when a model scores texts
(features, the linear probe's embeddings, evaluate's scoring and the served model; never
training). The modes are graft.precision's:

- `fp32`: full precision (the reference every other mode is checked against);
- `bf16`: bf16 autocast; fast on a GPU and on CPUs with native bf16 dot products (AVX512-BF16,
  AMX); elsewhere emulated, and slower than fp32;
- `int8`: torch dynamic quantization of every `nn.Linear`, CPU only;
- `bf16_compiled`: a bf16 copy compiled by torch.compile (inductor, freezing): on a 2-core AMX
  CPU 4.7-5.6x fp32 where eager bf16 is 2.9-3.1x, after a compile of 10-18 s in every process
  that scores (features, evaluate once per model, register, the server's first request).

`model.inference: auto` measures, on a sample of the validation split, every mode this machine
runs natively against fp32 and picks, of those that pass every check (`choose`), the one that
would embed the stage's workload (every split's texts) soonest: the checks are the embeddings'
cosine to fp32 (min over the sample >= MIN_COSINE), a probe fit on train embeddings scoring
validation within the interval of fp32's accuracy, and a speed-up of at least MIN_SPEEDUP (a mode
no faster is not worth a precision loss). Among eager modes that is the fastest; the compiled
mode is tried only when eager bf16 would spend COMPILE_MIN_SECONDS or more on the workload, and
is charged its measured compile seconds. The features stage records the choice in its recipe;
every later stage and the serving description read it from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from graft.errors import GraftError
from graft.precision import BF16_MODES, COMPILED, MODES, cpp_compiler, cpu_has_native_bf16

CHOICES = ("auto", *MODES)
MIN_COSINE = 0.999  # embeddings' cosine to fp32, min over the sample
MIN_SPEEDUP = 1.1  # texts/s over fp32's, best of the timed passes
SAMPLE = 128  # validation texts timed and compared (and train texts the check's probe is fit on)
# Eager bf16 seconds over the workload below which the compiled mode is not tried: a compile took
# 10-18 s on 2 cores (all-MiniLM-L6-v2, warm and cold inductor cache) and saves at most ~40% of
# eager bf16's time (4.7-5.6x fp32 against 2.9-3.1x), and evaluate and register compile again.
COMPILE_MIN_SECONDS = 60.0


def unsupported(mode: str, device: torch.device) -> str | None:
    """Why `mode` does not run natively on `device` (None: it does)."""
    if mode not in MODES:
        raise GraftError(f"model.inference {mode!r}: expected one of {', '.join(CHOICES)}")
    if mode in BF16_MODES and device.type == "cpu" and not cpu_has_native_bf16():
        return ("this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): bf16 is emulated "
                "there, several times slower than fp32")
    if mode == "int8":
        if device.type != "cpu":
            return f"int8 dynamic quantization runs on the CPU only, not on {device.type}"
        if not set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack", "onednn"}:
            return f"this torch build has no quantized engine ({torch.backends.quantized.supported_engines})"
    return cannot_run(mode, device)


def cannot_run(mode: str, device: torch.device) -> str | None:
    """Why `mode` cannot run on `device` at all (None: it can): the compiled mode without a
    compiler for its kernels."""
    if mode == COMPILED:
        if device.type == "cpu" and not cpp_compiler():
            return "torch.compile needs a C++ compiler on the CPU (g++, c++, clang++ or $CXX); none is on PATH"
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "torch.compile needs triton on a GPU; this torch has none"
    return None


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def accuracy_interval(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy on n items (at least one item's worth)."""
    return max(1.96 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1)), 1.0 / max(n, 1))


def choose(requested: str, device: torch.device, *, embed: Callable[[Sequence[str], str], np.ndarray],
           train_texts: Sequence[str], train_y: np.ndarray, val_texts: Sequence[str], val_y: np.ndarray,
           seed: int = 0, workload: int | None = None) -> tuple[str, dict]:
    """The mode features (and every later stage) use, and the facts behind it. `embed(texts,
    mode)` gives the frozen backbone's embeddings in a mode. A mode set in params is used as it
    is (its facts say whether it runs natively here); `auto` measures. `workload`: how many texts
    the stage embeds in the chosen mode (None: unknown; the compiled mode is then not tried)."""
    if requested != "auto":
        if blocked := cannot_run(requested, device):
            raise GraftError(f"model.inference {requested!r}: {blocked}")
        why = unsupported(requested, device)
        return requested, {"requested": requested, "chosen": requested, "device": device.type,
                           "why": "set in params" + (f"; note: {why}" if why else ""), "modes": {}}
    modes: dict[str, dict] = {}
    candidates = []
    for mode in MODES[1:]:
        why = unsupported(mode, device)
        if why:
            modes[mode] = {"passed": False, "skipped": why}
        else:
            candidates.append(mode)
    if not candidates:
        return "fp32", {"requested": "auto", "chosen": "fp32", "device": device.type, "modes": modes,
                        "why": "no mode faster than fp32 runs natively here"}
    rng = np.random.default_rng(seed)
    val_pick = np.sort(rng.permutation(len(val_texts))[:SAMPLE])
    train_pick = np.sort(rng.permutation(len(train_texts))[:SAMPLE])
    val_sample = [val_texts[i] for i in val_pick]
    train_sample = [train_texts[i] for i in train_pick]
    y_val, y_train = np.asarray(val_y)[val_pick], np.asarray(train_y)[train_pick]

    def timed(mode: str) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        rows = embed(val_sample, mode)
        return rows, time.perf_counter() - started

    embed(val_sample[:8], "fp32")  # warm-up (first-call allocations)
    reference, ref_seconds = timed("fp32")
    reference_accuracy: float | None = None
    for mode in candidates:
        if mode == COMPILED and (why := _compile_not_worth(modes.get("bf16"), workload)):
            modes[mode] = {"passed": False, "skipped": why}
            continue
        started = time.perf_counter()
        embed(val_sample[:8], mode)  # for the compiled mode, the compile
        warm_up = time.perf_counter() - started
        rows, seconds = timed(mode)
        cos = cosines(rows, reference)
        if cos.min() >= MIN_COSINE:  # worth timing again, alternating: a neighbour's load hits both
            again, ref_again = timed(mode)[1], timed("fp32")[1]
            seconds, ref_seconds = min(seconds, again), min(ref_seconds, ref_again)
        facts = {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
                 "speedup": round(ref_seconds / max(seconds, 1e-9), 3),
                 "texts_per_s": round(len(val_sample) / max(seconds, 1e-9), 2)}
        if mode == COMPILED:
            facts["compile_seconds"] = round(warm_up, 2)
        failed = []
        if facts["min_cosine"] < MIN_COSINE:
            failed.append(f"min cosine to fp32 {facts['min_cosine']:.4f} < {MIN_COSINE}")
        if facts["speedup"] < MIN_SPEEDUP:
            failed.append(f"speed-up {facts['speedup']:.2f}x < {MIN_SPEEDUP}x")
        if not failed and len(set(y_train.tolist())) > 1:  # the probe check only for a mode worth it
            if reference_accuracy is None:
                reference_accuracy = _probe_accuracy(embed(train_sample, "fp32"), y_train, reference, y_val, seed)
            accuracy = _probe_accuracy(embed(train_sample, mode), y_train, rows, y_val, seed)
            width = accuracy_interval(reference_accuracy, len(y_val))
            facts.update(probe_accuracy=round(accuracy, 4), fp32_probe_accuracy=round(reference_accuracy, 4),
                         interval=round(width, 4))
            if abs(accuracy - reference_accuracy) > width:
                failed.append(f"probe accuracy {accuracy:.3f} outside fp32's {reference_accuracy:.3f} +- {width:.3f}")
        modes[mode] = {**facts, "passed": not failed, **({"failed": failed} if failed else {})}
    modes["fp32"] = {"texts_per_s": round(len(val_sample) / max(ref_seconds, 1e-9), 2), "passed": True}
    passing = [m for m in candidates if modes[m]["passed"]]
    if workload is not None:  # the seconds each mode would spend on the stage's texts, compile included
        for mode in ("fp32", *passing):
            row = modes[mode]
            row["workload_seconds"] = round(row.get("compile_seconds", 0.0) + workload / row["texts_per_s"], 1)
        chosen = min(passing, key=lambda m: modes[m]["workload_seconds"]) if passing else "fp32"
    else:
        chosen = max(passing, key=lambda m: modes[m]["speedup"]) if passing else "fp32"
    why = (f"{chosen}: {modes[chosen]['speedup']:.2f}x fp32 at min cosine {modes[chosen]['min_cosine']:.4f}"
           if chosen != "fp32" else "no faster mode passed: " + "; ".join(
               f"{m}: {', '.join(f.get('failed') or [f.get('skipped', '')])}" for m, f in modes.items() if m != "fp32"))
    if chosen != "fp32" and workload is not None:
        facts = modes[chosen]
        why += (f"; {workload} texts in ~{facts['workload_seconds']:.0f} s"
                + (f" ({facts['compile_seconds']:.0f} s of it compiling)" if "compile_seconds" in facts else ""))
    return chosen, {"requested": "auto", "chosen": chosen, "device": device.type, "why": why, "sample": len(val_sample),
                    "workload": workload, "thresholds": {"min_cosine": MIN_COSINE, "min_speedup": MIN_SPEEDUP,
                                                         "compile_min_seconds": COMPILE_MIN_SECONDS},
                    "modes": modes}


def _compile_not_worth(bf16: dict | None, workload: int | None) -> str | None:
    """Why the compiled mode is not tried (None: it is): it is bf16's compiled copy, worth a compile
    only when eager bf16 passed and would spend COMPILE_MIN_SECONDS or more on the workload."""
    if workload is None:
        return "no workload given: a compile's cost cannot be weighed"
    if not bf16 or not bf16.get("passed"):
        return "bf16 did not pass here, so its compiled copy is not tried"
    eager = workload / bf16["texts_per_s"]
    if eager < COMPILE_MIN_SECONDS:
        return (f"{workload} texts take ~{eager:.0f} s in eager bf16, under {COMPILE_MIN_SECONDS:.0f} s: "
                f"a compile (10-18 s a process on 2 cores) would not pay for itself")
    return None


def _probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    return float((probe.predict(val_x) == val_y).mean())
