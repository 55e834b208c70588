"""How graft's stages scale with the corpus (issue 15, "Scale"): the default BBC News corpus at 1x,
4x and 16x its size, each stage in its own subprocess, wall seconds and peak RSS per stage.

A k-x corpus is the BBC articles (after dropping exact duplicate texts, as prepare would) k times:
replica 0 is the original text; replica r >= 1 has its sentences rotated by r (the sentence that
was r-th comes first) and the marker word `replicaR` appended, so every text is distinct (graft
de-duplicates by text and refuses one text under two labels) and the backbone, which keeps the
head of each text, sees other tokens in each replica. train_size and val_size are 250 x k (the
test split is the rest), so every stage sees k times the rows.

    python benchmarks/scale.py --scratch /tmp/graft-scale --backbone tiny --sizes 1 4 16 --epochs 5 --threads 1
    python benchmarks/scale.py --scratch /tmp/graft-scale --backbone minilm --sizes 1 4
    python benchmarks/scale.py --scratch /tmp/graft-scale --backbone tiny --sizes 4 16 --profile train

Backbones: `minilm` (model.ref of params.yaml, the packaged all-MiniLM-L6-v2) and `tiny`, a
2-layer random-weight BERT (hidden 32) built from a config with a word-level vocabulary of the BBC
texts (tests/conftest.py's builder): its forward passes cost little, so graft's own code
(tokenisation, TF-IDF, the C grids, bootstrap, probes, reports) dominates, which is what shows
whether anything grows faster than linearly.

Every stage of dvc.yaml runs (adapt, curve and domain are off in params.yaml, so they measure a
stage's start-up); register logs to a SQLite MLflow store in the size's workspace. The gate is
relaxed (verdict any, no thresholds) so register registers and runs its parity check at every
size, as it would for a passing model. Writes <scratch>/<backbone>/scale.json (raw seconds and
peak MB per stage and size; a rerun skips the sizes already there) and scale.md (the table).
`--profile STAGE` reruns one stage under cProfile in the sizes' finished workspaces and writes
the top functions by cumulative time next to them.

Read CPU seconds on shared cores: wall seconds count time the stage waited for the cores (or was
stopped). The marker sits at the end, past the 128-token head the backbone keeps: a replica of a
text with fewer sentences than k can look the same to the model as another replica of it (at 16x,
evaluate ran 334 batches of 64, at most 21,376 distinct token sequences, for 26,032 test rows), so
forward passes grow a little slower than the rows; TF-IDF and every text-level step see k distinct
texts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "fetch", "select", "features", "adapt", "curve", "domain", "train", "evaluate", "register")
BASE_SPLIT = 250  # params.yaml's train_size and val_size
SUPERLINEAR = 1.25  # s per 1k rows at 16x over 1x above this is flagged
SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")
# Runs a stage's code in a grandchild and writes its ru_maxrss (KiB) and CPU seconds (user + system,
# less swayed than wall seconds by other work on the same cores): Linux carries the memory
# high-water mark of the process that forks into the child's across exec, so a stage started
# straight from this script (pandas, transformers loaded) would never read below this script's RSS.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[2], "w") as out:
    out.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def base_corpus() -> pd.DataFrame:
    """The default data set's text and label columns, exact duplicate texts dropped (the same text
    under two labels is an error here, as in prepare)."""
    from graft.sources import read_table

    params = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    frame = read_table(params["source"], encoding_fallback=params["encoding_fallback"])
    frame = frame[["text", "label"]].astype(str).drop_duplicates().reset_index(drop=True)
    clash = frame["text"].duplicated(keep=False)
    if clash.any():
        raise ValueError(f"{int(clash.sum())} rows of the default corpus share a text under another label")
    return frame


def replica_text(text: str, replica: int) -> str:
    """Replica 0 is the text; replica r has its sentences rotated by r (the whitespace between
    sentences stays where it was, so texts that differ only in spacing stay distinct) and ends in
    ` replica<r>`."""
    if replica == 0:
        return text
    pieces = SENTENCE_END.split(text)  # sentence, whitespace, sentence, ...
    sentences, gaps = pieces[::2], pieces[1::2]
    shift = replica % len(sentences)
    sentences = sentences[shift:] + sentences[:shift]
    return "".join(s + g for s, g in zip(sentences, [*gaps, ""], strict=True)) + f" replica{replica}"


def build_corpus(base: pd.DataFrame, k: int) -> pd.DataFrame:
    """`base` k times with distinct texts (replica_text) and the same labels; raises if any two
    texts coincide."""
    parts = [pd.DataFrame({"text": [replica_text(t, r) for t in base["text"]], "label": base["label"].to_numpy()})
             for r in range(k)]
    corpus = pd.concat(parts, ignore_index=True)
    if len(corpus) != k * len(base) or corpus["text"].nunique() != len(corpus):
        raise ValueError(f"{k}x corpus: {corpus['text'].nunique()} distinct texts in {len(corpus)} rows, "
                         f"expected {k * len(base)}")
    return corpus


def tiny_backbone(folder: Path, texts: list[str]) -> Path:
    """The tests' tiny random-weight BERT with BBC's words as vocabulary and 512 positions (the
    default max_length, 128, fits)."""
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_bert

    return build_tiny_bert(folder, texts, max_position_embeddings=512)


def workspace(root: Path, corpus: pd.DataFrame, k: int, model_ref: str, epochs: int | None) -> Path:
    """A scratch checkout of the pipeline (dvc.yaml, graft/) with the k-x corpus and its params."""
    from graft import config
    from graft.layout import Layout
    from graft.pins import write_sources

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "graft", root / "graft", ignore=shutil.ignore_patterns("__pycache__"))
    corpus.to_csv(root / "corpus.csv", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(root / "corpus.csv"), id_column="id", train_size=BASE_SPLIT * k,
                          val_size=BASE_SPLIT * k, test_size=None)
    params["model"]["ref"] = model_ref
    if epochs is not None:  # the same epochs at every size: no early stop
        params["train"].update(epochs=epochs, patience=None)
        for section in ("scratch", "full", "lora"):
            params["train"][section]["epochs"] = epochs
    params["gate"].update(required_verdict="any", min_margin=-100.0, min_accuracy=0.0, min_macro_f1=0.0,
                          max_group_gap=1.0, max_counterfactual_flip_rate=1.0, max_robustness_flip_rate=1.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_sources(config.load(root / "params.yaml"), Layout(root))
    return root


def run_stage(root: Path, stage: str, profile: Path | None = None, threads: int | None = None) -> dict:
    """Run `tasks.<stage>.main()` in a child process in `root`; its wall seconds, CPU seconds and
    peak RSS (MB), of the stage's process and what it waited for, read by LAUNCHER."""
    call = f"import tasks.{stage} as t; t.main()"
    if profile is not None:
        call = f"import cProfile, tasks.{stage} as t\ncProfile.run('t.main()', {str(profile)!r})"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    log = root / "logs" / f"{stage}{'.profile' if profile else ''}.log"
    log.parent.mkdir(exist_ok=True)
    peak = root / "logs" / f"{stage}.maxrss"
    with log.open("w") as out:
        started = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", LAUNCHER, call, str(peak)], cwd=root, env=env,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - started
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage {stage} in {root} exited {child.returncode}; the end of {log}:\n{tail}")
    maxrss, cpu = peak.read_text().split()
    return {"seconds": round(seconds, 2), "cpu_seconds": round(float(cpu), 2), "peak_mb": round(int(maxrss) / 1024, 1)}


def measure_size(root: Path, k: int, rows: int, done: dict, save, threads: int | None) -> dict:
    """Run the stages not in `done["stages"]` yet, saving after each one (a rerun resumes there)."""
    result = {"k": k, "rows": rows, "stages": {}, **done}
    for stage in STAGES:
        if stage in result["stages"]:
            continue
        result["stages"][stage] = m = run_stage(root, stage, threads=threads)
        print(f"  {k}x {stage}: {m['seconds']} s ({m['cpu_seconds']} s CPU), peak {m['peak_mb']} MB", flush=True)  # noqa: T201
        save(result)
    card = json.loads((root / "data" / "prepared" / "datacard.json").read_text())
    result["splits"] = {name: split["rows"] for name, split in card["splits"].items()}
    return result


def table(results: dict) -> str:
    """Markdown: per stage, wall (and, where every size has them, CPU) seconds per 1,000 corpus
    rows at each size with the growth (largest size measured over the smallest; above SUPERLINEAR
    flagged), and peak RSS per size; then the slowest stage per size. A size still running (or
    stopped) shows the stages it finished; `-` marks the rest."""
    sizes = sorted(results["sizes"].values(), key=lambda r: r["k"])
    stages_of = [r["stages"] for r in sizes]
    metrics = ["seconds"] + (["cpu_seconds"] if all("cpu_seconds" in m for st in stages_of for m in st.values())
                             else [])
    complete = lambda r: "splits" in r  # noqa: E731
    label = lambda r: f"{r['k']}x" + ("" if complete(r) else " (partial)")  # noqa: E731
    head = []
    for metric in metrics:
        name = "s" if metric == "seconds" else "CPU s"
        head += [f"{name}/1k rows {label(r)}" for r in sizes] + ([f"{name} growth"] if len(sizes) > 1 else [])
    head += [f"peak MB {r['k']}x" for r in sizes]
    lines = ["| stage | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for stage in [*STAGES, "total"]:
        cells = []
        for metric in metrics:
            if stage == "total":
                values = [sum(m[metric] for m in r["stages"].values()) / (r["rows"] / 1000) if complete(r) else None
                          for r in sizes]
            else:
                values = [r["stages"][stage][metric] / (r["rows"] / 1000) if stage in r["stages"] else None
                          for r in sizes]
            cells += ["-" if v is None else f"{v:.3f}" for v in values]
            known = [v for v in values if v is not None]
            if len(sizes) > 1:
                growth = known[-1] / known[0] if len(known) > 1 else None
                cells.append("-" if growth is None else f"{growth:.2f}" + (" **superlinear**" if growth > SUPERLINEAR
                                                                            else ""))
        if stage == "total":
            cells += [f"{max(m['peak_mb'] for m in r['stages'].values()):.0f} (max)" for r in sizes]
        else:
            cells += [f"{r['stages'][stage]['peak_mb']:.0f}" if stage in r["stages"] else "-" for r in sizes]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    done = [r for r in sizes if complete(r)]
    if len(done) >= 3:
        lines += ["", marginal_table(done, metrics[-1])]
    lines.append("")
    lines.append("Rows: " + " / ".join(
        f"{r['k']}x: {r['rows']}" + (f" (train {r['splits']['train']}, val {r['splits']['val']}, test {r['splits']['test']})"
                                    if complete(r) else "") for r in sizes) + ".")
    lines.append("")
    lines.append("| size | slowest stage | seconds | share of the stages run |")
    lines.append("|---|---|---|---|")
    for r in sizes:
        total = sum(m["seconds"] for m in r["stages"].values())
        stage = max(r["stages"], key=lambda s: r["stages"][s]["seconds"])
        lines.append(f"| {label(r)} | {stage} | {r['stages'][stage]['seconds']:.1f} | "
                     f"{r['stages'][stage]['seconds'] / total:.0%} of {total:.1f} s |")
    lines.append("")
    lines.append("Raw seconds per stage: " + "; ".join(
        f"{r['k']}x " + ", ".join(f"{s} {m['seconds']}" for s, m in r["stages"].items()) for r in sizes) + ".")
    return "\n".join(lines) + "\n"


def stage_cost(size: dict, stage: str, metric: str) -> float:
    if stage == "total":
        return sum(m[metric] for m in size["stages"].values())
    return size["stages"][stage][metric]


def marginal_table(sizes: list[dict], metric: str) -> str:
    """The cost of the rows added between consecutive sizes, per 1,000 rows: per-row seconds of
    the whole stage hide a superlinear part under a fixed start-up cost, the slope does not. The
    ratio is the last slope over the first (above SUPERLINEAR flagged)."""
    name = "s" if metric == "seconds" else "CPU s"
    pairs = list(zip(sizes, sizes[1:], strict=False))
    head = [f"marginal {name}/1k rows {a['k']}x->{b['k']}x" for a, b in pairs] + ["slope ratio"]
    lines = ["| stage | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for stage in [*STAGES, "total"]:
        slopes = [(stage_cost(b, stage, metric) - stage_cost(a, stage, metric)) / ((b["rows"] - a["rows"]) / 1000)
                  for a, b in pairs]
        if stage_cost(sizes[-1], stage, metric) < 1.5 * stage_cost(sizes[0], stage, metric):
            # 16x the rows, not half as much again: start-up cost, and slopes of noise
            ratio = "- (flat)"
        else:
            value = slopes[-1] / slopes[0]
            ratio = f"{value:.2f}" + (" **superlinear**" if value > SUPERLINEAR else "")
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in slopes) + f" | {ratio} |")
    return "\n".join(lines)


def profile_stage(folder: Path, stage: str, sizes: list[int], top: int, threads: int | None) -> None:
    import pstats

    for k in sizes:
        root = folder / f"k{k}"
        prof = root / f"{stage}.prof"
        m = run_stage(root, stage, profile=prof, threads=threads)
        report = root / f"{stage}.profile.txt"
        with report.open("w") as out:
            out.write(f"{stage} at {k}x under cProfile: {m['seconds']} s, peak {m['peak_mb']} MB\n")
            pstats.Stats(str(prof), stream=out).sort_stats("cumulative").print_stats(top)
        print(f"{stage} at {k}x under cProfile: {m['seconds']} s -> {report}", flush=True)  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder for corpora, workspaces and results")
    parser.add_argument("--backbone", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="multiples of the default corpus")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every trained strategy and baseline, early stopping off (default: params.yaml's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads per stage (default: the libraries' own, one per core). On cores "
                             "shared with other work, 1 keeps torch's threads from spinning against it")
    parser.add_argument("--profile", choices=STAGES, default=None, help="rerun this stage under cProfile only")
    parser.add_argument("--top", type=int, default=40, help="functions listed per profile")
    args = parser.parse_args()

    folder = args.scratch / args.backbone
    folder.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_stage(folder, args.profile, args.sizes, args.top, args.threads)
        return
    out = folder / "scale.json"
    results = json.loads(out.read_text()) if out.exists() else {"backbone": args.backbone, "sizes": {}}
    for key in ("epochs", "threads"):
        if results.get(key, getattr(args, key)) != getattr(args, key):
            raise SystemExit(f"{out} was measured with {key} {results[key]}, not {getattr(args, key)}: use another --scratch")
        results[key] = getattr(args, key)
    base = base_corpus()
    if args.backbone == "tiny":
        model_ref = str(tiny_backbone(args.scratch / "tiny-bert", base["text"].tolist()))
    else:
        model_ref = yaml.safe_load((REPO / "params.yaml").read_text())["model"]["ref"]
    results["model_ref"] = model_ref
    def save(size: dict) -> None:
        results["sizes"][str(size["k"])] = size
        out.write_text(json.dumps(results, indent=2) + "\n")

    for k in args.sizes:
        done = results["sizes"].get(str(k), {"stages": {}})
        if "splits" in done:
            print(f"{k}x: already measured in {out}, skipped", flush=True)  # noqa: T201
            continue
        corpus = build_corpus(base, k)
        print(f"{k}x: {len(corpus)} rows ({len(base)} distinct BBC texts x {k}), backbone {args.backbone}",  # noqa: T201
              flush=True)
        root = folder / f"k{k}"
        if not done["stages"]:
            workspace(root, corpus, k, model_ref, args.epochs)
        size = measure_size(root, k, len(corpus), done, save, args.threads)
        size["wall_seconds"] = round(sum(m["seconds"] for m in size["stages"].values()), 1)
        save(size)
        (folder / "scale.md").write_text(table(results))
        print(f"{k}x done: {size['wall_seconds']} s of stages", flush=True)  # noqa: T201
    print(table(results), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
