"""Shared fixtures: a tiny random-weight BERT built from a config, a committed 48-row data set,
and a throw-away pipeline workspace (git + DVC) in tmp_path."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
NEWS_CSV = FIXTURES / "news_tiny.csv"
SHARED_DATA = REPO.parent / "shared" / "data"
# What a workspace needs to run the stages exactly as a user's checkout does.
WORKSPACE_FILES = ("dvc.yaml", "params.yaml", "graft", "tasks", "flows")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...), read from /proc: a test
    picks its victim among the processes it started, never by name machine-wide."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name (field 2) may hold spaces and parentheses: split after the last ')'
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = sorted(child for child, ppid in parents.items() if ppid == parent)
        found += children
        todo += children
    return found


def argv(pid: int) -> list[str]:
    """A process's arguments; empty when it has ended."""
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def wait_for_descendant(proc: subprocess.Popen, args: tuple[str, ...], timeout: float) -> int:
    """The PID of the first process below `proc` whose arguments contain `args` in a row (as
    separate arguments: `sh -c "python -m tasks.train"` is not `python -m tasks.train`)."""
    def runs(pid: int) -> bool:
        have = argv(pid)
        return any(tuple(have[i:i + len(args)]) == args for i in range(len(have)))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid in descendants(proc.pid) if runs(pid)]
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {' '.join(args)} started")
        time.sleep(0.2)
    raise AssertionError(f"no `{' '.join(args)}` process below PID {proc.pid} within {timeout}s")


def build_tiny_bert(out_dir: Path, texts: list[str], *, initializer_range: float = 0.02, **sizes: int) -> Path:
    """A 2-layer BERT with hidden size 32 and a word-level vocabulary of the given texts.
    `initializer_range` (BERT's 0.02 by default) also sets the std of a new head's weights;
    `sizes` replace BertConfig fields (benchmarks/gpu_check.py builds a 3-layer one, and a
    BERT-base-sized one where no pretrained backbone is installed)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.strip(".,").lower() for t in texts for w in t.split()})
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]) + "\n")
    # `vocab=`: transformers 5 ignores `vocab_file=` here and builds a 5-token vocabulary (every word [UNK])
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64, **sizes}
    cfg = BertConfig(vocab_size=len(tokenizer), architectures=["BertModel"], initializer_range=initializer_range,
                     **shape)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def environment_restored(*keys: str):
    """Put these environment variables back as they were (absent ones removed) afterwards."""
    import os

    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def prefect_home_of_the_tests(tmp_path_factory):
    """A `graft run` the tests start uses Prefect's ephemeral API, a SQLite file under
    PREFECT_HOME: the tests' own, not the user's `~/.prefect` that a pipeline running beside the
    suite writes to. (In-process flows run under `prefect_test_harness`, which has its own.)"""
    import os

    # a fresh home migrates a new database first: on 2 busy cores that outlasts Prefect's 20 s
    ours = {"PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    with environment_restored(*ours):
        os.environ.update(ours)
        yield


@pytest.fixture(autouse=True)
def mlflow_environment_restored():
    """`mlflow.set_tracking_uri` / `set_registry_uri` export MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, and setting them back to None does not remove the variables: every later
    subprocess (a DVC stage, `mlflow models serve`) would talk to a test's old store."""
    with environment_restored("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import pandas as pd

    texts = pd.read_csv(NEWS_CSV)["text"].tolist()
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


def tiny_params(model_dir: Path, data_source: Path = NEWS_CSV) -> dict:
    """params.yaml of the repository, shrunk to the 48-row fixture and the tiny model."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(data_source), train_size=18, val_size=12, test_size=18)
    # fp32 scoring, for the same reason as fp32 steps below (auto scores in bf16 on a CPU with native bf16)
    params["model"].update(ref=str(model_dir), max_length=32, inference="fp32")
    params["features"]["batch_size"] = 8
    # fp32 steps: tests compare numbers across runs and code paths on whatever CPU runs them (auto
    # would train in bf16 on one with native bf16); step_precision has its own test
    params["train"].update(epochs=2, batch_size=6, freeze_layers=1, lr=5e-3, precision="fp32")
    params["train"]["scratch"].update(epochs=2, lr=5e-3)
    params["evaluate"]["bootstrap_samples"] = 100
    params["gate"].update(min_accuracy=0.0, min_macro_f1=0.0, required_verdict="any", min_margin=-100.0,
                          max_group_gap=1.0,
                          max_counterfactual_flip_rate=1.0, max_robustness_flip_rate=1.0)
    return params


def make_workspace(root: Path, params: dict) -> Path:
    """A git + DVC checkout of the pipeline with its own params and a local DVC remote."""
    root.mkdir(parents=True, exist_ok=True)
    for name in WORKSPACE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root.parent / f"{root.name}-remote"))
    # a user's checkout carries its source pins (committed with dvc.lock); a test of a bad
    # source gets none, and graft reports the source when it tries to pin it
    from graft.errors import GraftError

    try:
        pin_sources(root)
    except GraftError:
        pass
    return root


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A fresh workspace with pinned sources, made the current directory (stages read and write
    relative paths)."""
    root = make_workspace(tmp_path / "ws", tiny_params(tiny_model_dir))
    monkeypatch.chdir(root)
    pin_sources(root)
    return root


def pin_sources(root: Path) -> None:
    """Write data/source.yaml and models/source.yaml from the workspace's params.yaml."""
    from graft.layout import Layout
    from graft.pins import write_sources

    write_sources(load_params(root), Layout(root))


def run_prepare(root: Path, params=None) -> dict:
    """The prepare stage's function on the workspace's layout (sources pinned for `params`)."""
    from graft.layout import Layout
    from graft.pins import write_sources
    from tasks.prepare import prepare

    params = params or load_params(root)
    layout = Layout(root)
    write_sources(params, layout)
    return prepare(params, source_file=layout.data_source_file, raw_dir=layout.raw_dir, out_dir=layout.prepared_dir,
                   datacard_md=layout.datacard_md, plot=layout.plots_dir / "text_lengths.png")


def load_params(root: Path):
    from graft import config

    return config.load(root / "params.yaml")


def run_fetch(root: Path, params=None) -> dict:
    """The fetch stage's function on the workspace's layout (sources pinned for `params`):
    returns model.ref's manifest (the first candidate's)."""
    from graft.layout import Layout
    from graft.pins import write_sources
    from tasks.fetch import fetch

    params = params or load_params(root)
    layout = Layout(root)
    write_sources(params, layout)
    return fetch(params, source_file=layout.model_source_file, out_dir=layout.candidates_dir)["candidates"][0]["manifest"]


def run_select(root: Path, params=None) -> dict:
    from graft.layout import Layout
    from tasks.select import select

    layout = Layout(root)
    return select(params or load_params(root), candidates_dir=layout.candidates_dir, prepared_dir=layout.prepared_dir,
                  out_dir=layout.pretrained_dir, report=layout.transferability, plot=layout.transferability_plot)


def run_features(root: Path, params=None) -> dict:
    from graft.layout import Layout
    from tasks.features import features

    layout = Layout(root)
    return features(params or load_params(root), pretrained_dir=layout.pretrained_dir,
                    prepared_dir=layout.prepared_dir, out_dir=layout.features_dir,
                    length_report=layout.sequence_length, length_plot=layout.token_lengths_plot,
                    inference_report=layout.inference_report)


ALL_STRATEGIES = ["linear_probe", "partial", "full", "lora"]


@pytest.fixture(scope="session")
def all_strategies_evaluated(tmp_path_factory) -> Path:
    """One tiny workspace trained once with every strategy (linear_probe, partial, full, lora)
    and evaluated, shared by the session: tests copy it before they change anything.

    Its outputs depend on what the model sees: at BERT's init (0.02) the tiny model's [CLS]
    output is nearly the same for every text (probabilities vary by 3e-6), so a wrong head or
    max_length would go unseen; at 0.5 they vary by 0.2. max_length 12 truncates most texts."""

    base = tmp_path_factory.mktemp("all-strategies")
    model_dir = build_tiny_bert(base / "tiny-bert", pd_texts(NEWS_CSV), initializer_range=0.5)
    params = tiny_params(model_dir)
    params["model"]["max_length"] = 12
    params["train"]["strategies"] = list(ALL_STRATEGIES)
    params["train"]["full"]["epochs"] = params["train"]["lora"]["epochs"] = 2
    # the tiny model loses to TF-IDF; these tests are about what is served, not the verdict
    params["register"]["promotion"]["verdicts"] = ["positive", "no_gain", "negative"]
    root = make_workspace(base / "ws", params)
    return run_through_evaluate(root)


def run_through_evaluate(root: Path) -> Path:
    """prepare, fetch, select, features, train and evaluate by their functions, in `root`."""
    from tasks.evaluate import evaluate
    from tasks.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        params = load_params(root)
        run_prepare(root)
        run_fetch(root)
        run_select(root)
        run_features(root)
        train(params)
        evaluate(params)
    return root


def pd_texts(csv: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(csv)["text"].tolist()
