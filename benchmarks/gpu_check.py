"""GPU check: on one CUDA device, in under 5 minutes, whether graft uses it well. Run it
through benchmarks/gpu_check.sh (it puts the repository on PYTHONPATH; its header says how to
run it on a lent GPU with the `device` tool):

    bash benchmarks/gpu_check.sh --out gpu_check.json     # on a CUDA machine
    bash benchmarks/gpu_check.sh --dry-run                # CPU smoke run, tiny sizes, < 60 s

Four sections, each printed as lines and written as one JSON document (to `--out`, else to
stdout after the lines); the exit code is 1 when any section failed, 2 for a usage error:

1. matmul: dense matmul TFLOP/s measured on the device, bf16, tf32 (CUDA only) and fp32
   (N x N x N, 2 N^3 FLOPs each; the mean of timed products after warm-ups, on random data).
2. finetune: graft's own training step (`graft.training.prepare_strategy` with the `partial`
   strategy, `fit` with train.precision bf16, everything else as params.yaml's train section
   says, no early stopping) on params.yaml's model.ref (MiniLM by default), or a random
   BERT-base-sized model from a config where that backbone is not installed. Samples/s and
   tokens/s of the last epoch (fit's own timing: the training steps, without validation or
   the frozen-layer cache), and the model FLOP utilisation (MFU, formula in FLOPS_FORMULA).
3. embed: `graft.modeling.embed` texts/s on the device (tokenization included, as the features
   stage runs it), after one warm-up batch.
4. parity: pytest on tests/test_parity.py (served = evaluated); its summary line. The dry run
   only collects them (imports the test module and everything it imports), for the reason in
   DRY_RUN_PARITY_SKIPPED.

Texts: the committed 48-row fixture (tests/fixtures/news_tiny.csv), each joined with the next
seven so that texts are news-length (truncated at max_length, as BBC's mostly are). The dry run
uses a tiny random-weight BERT built from a config as the tests do (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARITY_TESTS = "tests/test_parity.py"
DRY_RUN_PARITY_SKIPPED = (
    "not run in the dry run, only collected: every parity test needs the shared fixture that trains,"
    " evaluates and registers all four strategies (measured: over 120 s on 2 busy cores, for one test"
    " selected with -k)"
)
FLOPS_FORMULA = (
    "training FLOPs per epoch = 6 x trained encoder-block params x tokens"
    " + 6 x trained pooler/head params x sequences"
    " + 2 x frozen encoder-block params x tokens, only when the frozen blocks run in the step"
    " (not when fit cached their outputs before the epochs)"
    " + 2 x frozen pooler/head params x sequences;"
    " tokens: real (unpadded) tokens after truncation; not counted: embeddings (lookups), attention"
    " scores and softmax, layer norms, the optimizer step;"
    " MFU = those FLOPs / the epoch's seconds / the measured bf16 matmul peak"
)


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201


# ----------------------------------------------------------------------------------- sizes


def sizes(dry_run: bool) -> dict:
    """What each section runs on: on a GPU about a minute of work in all; dry run, seconds on a CPU."""
    if dry_run:
        return {"matmul_size": 256, "train_samples": 48, "val_samples": 16, "epochs": 2, "embed_texts": 96,
                "max_length": 32, "parity_timeout": 120}
    return {"matmul_size": 8192, "train_samples": 2048, "val_samples": 256, "epochs": 2, "embed_texts": 8192,
            "max_length": None, "parity_timeout": 180}


def read_params() -> dict:
    """params.yaml, the one place graft's defaults live (read as plain YAML: graft.config's
    validation needs pydantic, which a bare GPU machine may lack)."""
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


def news_like(count: int, join: int = 8) -> tuple[list[str], list[str]]:
    """`count` texts from the committed fixture, each joined with the next `join - 1`, and the
    first one's label."""
    import pandas as pd

    from tests.conftest import NEWS_CSV

    frame = pd.read_csv(NEWS_CSV)
    rows, labels = frame["text"].tolist(), frame["label"].tolist()
    texts = [" ".join(rows[(i + k) % len(rows)] for k in range(join)) for i in range(count)]
    return texts, [labels[i % len(rows)] for i in range(count)]


# ---------------------------------------------------------------------------------- timing


def mean_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Mean wall time of `fn` after `warmup` calls; CUDA events on a GPU (the work is queued,
    so the host clock alone would time the launches)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# -------------------------------------------------------------------------------- sections


def matmul_peak(device: torch.device, *, size: int, warmup: int = 3, repeats: int = 10) -> dict:
    """Dense N x N x N matmul TFLOP/s: bf16; fp32 through TF32 tensor cores (CUDA only); plain fp32."""
    kinds = [("bf16", torch.bfloat16, "highest")]
    if device.type == "cuda":
        kinds.append(("tf32", torch.float32, "high"))
    kinds.append(("fp32", torch.float32, "highest"))
    generator = torch.Generator(device=device).manual_seed(0)
    tflops = {}
    for name, dtype, precision in kinds:
        a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
        out = torch.empty(size, size, device=device, dtype=dtype)
        with float32_matmul_precision(precision):
            seconds = mean_seconds(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device,
                                   warmup=warmup, repeats=repeats)
        tflops[name] = 2 * size**3 / seconds / 1e12
        del a, b, out
    say(f"matmul: {size}^3, " + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in tflops.items())
        + f" (mean of {repeats} after {warmup} warm-ups)")
    return {"size": size, "warmup": warmup, "repeats": repeats, "tflops": tflops}


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by how often a step multiplies by them: per token (the encoder blocks) or per
    sequence (pooler, head); the embeddings are lookups."""
    from graft.modeling import encoder_layers

    base = getattr(model, model.base_model_prefix)
    embeddings = {id(p) for p in base.embeddings.parameters()}
    blocks = {id(p) for layer in encoder_layers(model) for p in layer.parameters()}
    counts = dict.fromkeys(("trained_per_token", "frozen_per_token", "trained_per_sequence",
                            "frozen_per_sequence", "embeddings"), 0)
    for p in model.parameters():
        if id(p) in embeddings:
            key = "embeddings"
        else:
            key = ("trained" if p.requires_grad else "frozen") + ("_per_token" if id(p) in blocks else "_per_sequence")
        counts[key] += p.numel()
    return counts


def training_flops(counts: dict[str, int], *, tokens: int, sequences: int, frozen_blocks_ran: bool) -> float:
    """One epoch's model FLOPs, as FLOPS_FORMULA says."""
    return (6 * counts["trained_per_token"] * tokens + 6 * counts["trained_per_sequence"] * sequences
            + (2 * counts["frozen_per_token"] * tokens if frozen_blocks_ran else 0)
            + 2 * counts["frozen_per_sequence"] * sequences)


def finetune(backbone: dict, device: torch.device, *, params: dict, size: dict, bf16_peak: float | None) -> dict:
    import numpy as np

    from graft.modeling import build_classifier, seed_everything, tokenize
    from graft.training import FitSettings, fit, prepare_strategy

    t = params["train"]
    freeze_layers = t["freeze_layers"]
    if not isinstance(freeze_layers, int):
        raise ValueError(f"train.freeze_layers is {freeze_layers!r}; the check needs a block count")
    texts, labels = news_like(size["train_samples"] + size["val_samples"])
    classes = sorted(set(labels))
    label_ids = np.array([classes.index(x) for x in labels])
    n = size["train_samples"]
    settings = FitSettings(lr=t["lr"], epochs=size["epochs"], batch_size=t["batch_size"], weight_decay=t["weight_decay"],
                           warmup_ratio=t["warmup_ratio"], grad_accumulation=t["grad_accumulation"],
                           max_length=backbone["max_length"], truncation=params["model"]["truncation"],
                           seed=params["seed"], cache_frozen=t["cache_frozen"], compile=t["compile"], precision="bf16")
    # seeded before the model is built, so the new head's init is the same every run
    seed_everything(settings.seed)
    model = build_classifier(backbone["dir"], classes=classes, name="finetune")
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=freeze_layers, lr=settings.lr,
                                             weight_decay=settings.weight_decay)
    counts = parameter_counts(model)
    result = fit(model, backbone["tokenizer"], train_texts=texts[:n], train_labels=label_ids[:n], val_texts=texts[n:],
                 val_labels=label_ids[n:], settings=settings, param_groups=groups, device=device,
                 freeze_layers=frozen, desc="finetune")
    # every rate below from the one (rounded) epoch time fit reports, so they agree with each other
    last = result["throughput"][-1]
    tokens = sum(len(ids) for ids in tokenize(backbone["tokenizer"], texts[:n], settings.max_length, settings.truncation))
    flops = training_flops(counts, tokens=tokens, sequences=n, frozen_blocks_ran=not result["frozen_cached"])
    model_tflops = flops / last["seconds"] / 1e12
    facts = {"model": backbone["name"], "strategy": "partial", "precision": settings.precision,
             "freeze_layers": frozen, "blocks": model.config.num_hidden_layers, "batch_size": settings.batch_size,
             "max_length": settings.max_length, "samples_per_epoch": n, "tokens_per_epoch": tokens,
             "epochs": result["epochs_run"], "epoch_seconds": last["seconds"], "samples_per_s": n / last["seconds"],
             "tokens_per_s": tokens / last["seconds"], "frozen_cached": result["frozen_cached"], "params": counts,
             "flops_per_epoch": flops, "model_tflops": model_tflops, "formula": FLOPS_FORMULA}
    say(f"finetune: {backbone['name']}, partial ({frozen} of {facts['blocks']} blocks frozen"
        f"{', their outputs cached' if result['frozen_cached'] else ''}), bf16, batch {settings.batch_size}, "
        f"max_length {settings.max_length}: epoch {facts['epochs']} of {n} samples in {last['seconds']:.3g} s = "
        f"{last['samples_per_s']:.4g} samples/s, {facts['tokens_per_s']:.4g} tokens/s")
    if bf16_peak is None:
        raise RuntimeError("no MFU: the matmul section measured no bf16 peak")
    facts["mfu"] = model_tflops / bf16_peak
    say(f"finetune: {model_tflops:.4g} model TFLOP/s = MFU {facts['mfu']:.3g} of the measured bf16 peak "
        f"({bf16_peak:.4g} TFLOP/s); trained params {counts['trained_per_token']:,} per token + "
        f"{counts['trained_per_sequence']:,} per sequence, frozen {counts['frozen_per_token']:,} per token")
    say(f"finetune: {FLOPS_FORMULA}")
    return facts


def embed_throughput(backbone: dict, device: torch.device, *, params: dict, size: dict) -> dict:
    import numpy as np

    from graft.modeling import embed, load_encoder

    texts, _ = news_like(size["embed_texts"])
    batch_size, truncation = params["features"]["batch_size"], params["model"]["truncation"]
    encoder, tokenizer = load_encoder(backbone["dir"]), backbone["tokenizer"]

    def run(some: list[str], mode: str) -> np.ndarray:
        return embed(encoder, tokenizer, some, max_length=backbone["max_length"], batch_size=batch_size,
                     device=device, truncation=truncation, inference=mode)

    # model.inference's modes that run natively here (graft.inference), fp32 the reference
    from graft.inference import cosines, unsupported
    from graft.precision import MODES

    modes = ["fp32", *(m for m in MODES[1:] if unsupported(m, device) is None)]
    facts: dict = {"model": backbone["name"], "texts": len(texts), "batch_size": batch_size,
                   "max_length": backbone["max_length"], "modes": {}}
    reference = None
    for mode in modes:
        started = time.perf_counter()
        run(texts[:batch_size], mode)  # warm-up: CUDA context, cuBLAS handles, kernel choice, a compile
        warm_up = time.perf_counter() - started
        started = time.perf_counter()
        vectors = run(texts, mode)
        seconds = time.perf_counter() - started
        if not np.isfinite(vectors).all():
            raise RuntimeError(f"embed ({mode}) returned non-finite embeddings")
        reference = vectors if reference is None else reference
        cos = cosines(vectors, reference)
        facts["modes"][mode] = {"seconds": seconds, "texts_per_s": len(texts) / seconds,
                                "min_cosine_to_fp32": float(cos.min()), "warm_up_seconds": warm_up}
        say(f"embed: {backbone['name']}, {len(texts)} texts, batch {batch_size}, max_length "
            f"{backbone['max_length']}, inference {mode}: {seconds:.3g} s = {len(texts) / seconds:.4g} texts/s, "
            f"min cosine to fp32 {cos.min():.5f} (warm-up {warm_up:.3g} s)")
    best = max(facts["modes"], key=lambda m: facts["modes"][m]["texts_per_s"])
    facts.update(seconds=facts["modes"][best]["seconds"], texts_per_s=facts["modes"][best]["texts_per_s"], fastest=best)
    return facts


def parity(*, dry_run: bool, timeout: float) -> dict:
    command = [sys.executable, "-m", "pytest", PARITY_TESTS, "-q", "-p", "no:cacheprovider"]
    if dry_run:
        say(f"parity: {DRY_RUN_PARITY_SKIPPED}")
        command.append("--collect-only")
    say(f"parity: {' '.join(command[1:])} (timeout {timeout:.0f} s)")
    # its own process group, so a timeout ends everything it started and nothing else
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # pytest's teardown stops the servers it started
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise RuntimeError(f"pytest ran past {timeout:.0f} s; its output ended: {output[-1500:]}") from None
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|errors?|skipped|deselected|tests? collected)", line)),
                   lines[-1] if lines else "(no output)")
    missing = sorted(set(re.findall(r"No module named '([^']+)'", output)))
    say(f"parity: {summary}" + (f"; missing python modules: {', '.join(missing)}" if missing else ""))
    if proc.returncode != 0:
        sys.stderr.write(output[-6000:])
        raise RuntimeError(f"pytest exited with {proc.returncode}: {summary}"
                           + (f" (missing python modules: {', '.join(missing)})" if missing else ""))
    def count(word: str) -> int:
        found = re.search(rf"(\d+) {word}", summary)
        return int(found.group(1)) if found else 0

    facts = {"command": command[1:], "returncode": proc.returncode, "summary": summary, "ran": not dry_run}
    if dry_run:
        return {**facts, "collected": count("tests? collected"), "skipped_reason": DRY_RUN_PARITY_SKIPPED}
    return {**facts, "passed": count("passed"), "failed": count("failed")}


# ------------------------------------------------------------------------------- plumbing


def missing_distributions() -> list[str]:
    """pyproject.toml's dependencies that this python lacks (named as pip names them)."""
    import importlib.metadata

    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    names = re.findall(r'^\s*"([A-Za-z0-9_.\-]+)', block.group(1), re.M) if block else []
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def load_backbone(*, dry_run: bool, params: dict, size: dict, workdir: Path) -> dict:
    """The model both model sections run: model.ref, else a random BERT-base-sized one."""
    from transformers import BertConfig

    from graft.errors import GraftError
    from graft.modeling import load_tokenizer
    from graft.sources import PACKAGE_PREFIX, package_path
    from tests.conftest import build_tiny_bert

    texts, _ = news_like(48)
    max_length = size["max_length"] or params["model"]["max_length"]
    if dry_run:
        name, path = "tiny random BERT (3 x 32, from a config)", build_tiny_bert(workdir / "tiny", texts, num_hidden_layers=3)
    else:
        ref = params["model"]["ref"]
        try:
            path = package_path(ref) if ref.startswith(PACKAGE_PREFIX) else Path(ref)
            if not path.is_dir():
                raise GraftError(f"{ref}: no such folder")
            name = ref
        except GraftError as err:
            base = BertConfig()  # transformers' defaults are BERT-base's sizes
            shape = {k: getattr(base, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "max_position_embeddings")}
            say(f"model: {err}; a random-weight BERT-base-sized model from a config instead")
            name = f"random BERT-base ({shape['num_hidden_layers']} x {shape['hidden_size']}, from a config)"
            path = build_tiny_bert(workdir / "bert-base", texts, **shape)
    if not isinstance(max_length, int):
        raise ValueError(f"model.max_length is {max_length!r}; pass --max-length")
    return {"name": name, "dir": path, "tokenizer": load_tokenizer(path), "max_length": max_length}


def run_section(report: dict, name: str, work: Callable[[], dict]) -> None:
    started = time.perf_counter()
    try:
        report[name] = {"status": "ok", **work()}
    except ModuleNotFoundError as err:
        report[name] = {"status": "failed", "error": f"python module {err.name!r} is missing from {sys.executable}"}
        say(f"{name}: FAILED: {report[name]['error']}")
    except Exception as err:  # a failed section is reported; the others still run
        traceback.print_exc()
        report[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        say(f"{name}: FAILED: {report[name]['error']}")
    report[name]["seconds"] = round(time.perf_counter() - started, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny random BERT, tiny sizes (a smoke run)")
    p.add_argument("--out", type=Path, help="write the JSON report here (default: stdout, after the lines)")
    p.add_argument("--max-length", type=int, help="tokens per text (default: model.max_length; dry run 32)")
    p.add_argument("--parity-timeout", type=float, help="seconds for the parity tests (default: 180; dry run 120)")
    a = p.parse_args()
    started = time.perf_counter()
    size = sizes(a.dry_run)
    size.update({k: v for k, v in (("max_length", a.max_length), ("parity_timeout", a.parity_timeout)) if v})
    if a.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        say("gpu_check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    facts = {"mode": "dry-run" if a.dry_run else "gpu", "device": name, "python": sys.executable,
             "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": size}
    say(f"gpu_check: {facts['mode']} on {name}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""))
    facts["missing_distributions"] = missing_distributions()
    if facts["missing_distributions"]:
        say(f"gpu_check: this python lacks {', '.join(facts['missing_distributions'])} (pyproject.toml dependencies); "
            "a section that imports one fails and names it")
    sections: dict = {}
    run_section(sections, "matmul", lambda: matmul_peak(device, size=size["matmul_size"]))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        backbone: dict = {}

        def model() -> dict:
            if not backbone:
                backbone.update(load_backbone(dry_run=a.dry_run, params=read_params(), size=size, workdir=Path(workdir)))
            return backbone

        peak = sections["matmul"].get("tflops", {}).get("bf16")
        run_section(sections, "finetune", lambda: finetune(model(), device, params=read_params(), size=size, bf16_peak=peak))
        run_section(sections, "embed", lambda: embed_throughput(model(), device, params=read_params(), size=size))
    run_section(sections, "parity", lambda: parity(dry_run=a.dry_run, timeout=size["parity_timeout"]))
    failed = [k for k, v in sections.items() if v["status"] != "ok"]
    report = {**facts, "sections": sections, "failed": failed, "seconds": round(time.perf_counter() - started, 2)}
    say(f"gpu_check: {'all sections ok' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']:.1f} s")
    text = json.dumps(report, indent=2, default=str)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
        say(f"gpu_check: report written to {a.out}")
    else:
        say(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
