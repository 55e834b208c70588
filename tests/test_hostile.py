"""Hostile inputs and faults (issue 13): each gets its exit code and one line naming the file, row,
key or URL at fault, before the work that would have failed late, and leaves what existed as it was.

Run alone with `pytest -m hostile`. Everything here is tiny: the 48-row fixture, the 2-layer
BERT, and `graft` stopped by its preflight before any Prefect or DVC machinery starts.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from graft import preflight, registry
from graft.baselines import has_tfidf_words, tfidf_vectorizer
from graft.cli import main
from graft.errors import ERROR_PREFIX, EXIT_BAD_INPUT, EXIT_TRANSIENT, WARNING_PREFIX, GraftError
from graft.layout import Layout

from .conftest import NEWS_CSV, load_params, make_workspace, run_fetch, run_prepare, tiny_params

pytestmark = pytest.mark.hostile

EMOJI = ["😀", "🎉", "🔥", "👍", "🚀", "🌟", "💡", "🍕"]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`: what a refused command must leave exactly as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _graft(capsys, *argv: str) -> tuple[int, list[str]]:
    """`graft ARGV` in this process: its exit code and its `graft:` lines."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [line for line in (captured.err + captured.out).splitlines() if line.startswith("graft:")]


def _refused(capsys, root: Path, *argv: str) -> tuple[int, str]:
    """Run a command that must be refused: nothing in the workspace changes, one error line."""
    before = _digests(root)
    code, lines = _graft(capsys, *argv)
    assert _digests(root) == before
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, lines
    return code, errors[0][len(ERROR_PREFIX):]


@pytest.fixture
def no_prefect_server(monkeypatch):
    """Whatever the developer's shell says, these runs would use Prefect's ephemeral API."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(preflight, "prefect_api_url", lambda: None)


# -- the model folder -------------------------------------------------------------------------------

def _tokenizer_less(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(src / name, dst / name)
    return dst


def _foreign_tokenizer(src: Path, dst: Path) -> Path:
    """The weights' folder with a 10-token vocabulary of some other model."""
    shutil.copytree(src, dst)
    (dst / "tokenizer.json").unlink()
    (dst / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e"]))
    return dst


@pytest.mark.parametrize("make, message", [
    (_tokenizer_less, "no tokenizer files (one of: tokenizer.json, vocab.txt, vocab.json + merges.txt, *.model); "
                      "found only ['config.json', 'model.safetensors']"),
    (_foreign_tokenizer, "the tokenizer knows 10 tokens but the model's embeddings have"),
], ids=["no-tokenizer-files", "foreign-tokenizer"])
def test_a_model_without_its_tokenizer_is_refused_in_fetch(workspace, tiny_model_dir, tmp_path, make, message):
    run_fetch(workspace)  # a good backbone fetched before: it must stay
    pretrained = Layout(workspace).candidates_dir
    before = _digests(pretrained)
    bad = make(tiny_model_dir, tmp_path / "bad-model")
    params = load_params(workspace)
    params = params.model_copy(update={"model": params.model.model_copy(update={"ref": str(bad)})})
    with pytest.raises(GraftError) as err:
        run_fetch(workspace, params)
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert str(err.value).startswith(f"{bad}: {message}")
    assert "\n" not in str(err.value)
    assert _digests(pretrained) == before


# -- the data ----------------------------------------------------------------------------------------

def _emoji_csv(path: Path, *, keep_words: int = 0, split: bool = False) -> Path:
    """The fixture with texts made of emoji only (distinct texts), except the first `keep_words`
    rows; `split`: the user's own split column, every training row emoji-only."""
    frame = pd.read_csv(NEWS_CSV)
    emoji = [" ".join(EMOJI[(i + k) % 8] for k in range(1 + i % 4)) + " " + "🙂" * (i + 1) for i in range(len(frame))]
    frame["text"] = [text if i < keep_words else emoji[i] for i, text in enumerate(frame["text"])]
    if split:
        frame["split"] = ["train" if i >= keep_words else ("val" if i % 2 else "test") for i in range(len(frame))]
    frame.to_csv(path, index=False)
    return path


def _with_source(root: Path, source: Path, **data):
    params = load_params(root)
    return params.model_copy(update={"data": params.data.model_copy(update={"source": str(source), **data})})


def test_emoji_only_texts_are_refused_in_prepare_naming_rows(workspace, tmp_path):
    source = _emoji_csv(tmp_path / "emoji.csv")
    with pytest.raises(GraftError) as err:
        run_prepare(workspace, _with_source(workspace, source))
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert str(err.value) == (
        f"{source}: column 'text': no text has a word the TF-IDF baseline can use (2+ letters or digits; "
        "emoji and punctuation are not words), rows [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, … 38 more]")
    assert not Layout(workspace).prepared_dir.exists()


def test_some_emoji_only_texts_are_kept(workspace, tmp_path):
    source = _emoji_csv(tmp_path / "emoji.csv", keep_words=24)
    card = run_prepare(workspace, _with_source(workspace, source))
    assert card["validation"]["rows_valid"] == 48


def test_a_training_split_without_words_is_refused(workspace, tmp_path):
    source = _emoji_csv(tmp_path / "emoji.csv", keep_words=12, split=True)
    with pytest.raises(GraftError, match="no text of the training split has a word the TF-IDF baseline can use"):
        run_prepare(workspace, _with_source(workspace, source, split_column="split"))


@pytest.mark.parametrize("text", ["😀 🎉", "a 😀", "ok 😀", "—!! ...", "x1", "日本語", "é"])
def test_validation_and_the_tfidf_baseline_agree_on_words(text):
    """What validation calls a text without words is exactly what the baseline cannot fit."""
    try:
        tfidf_vectorizer(2).fit([text])
        fits = True
    except ValueError:  # scikit-learn: empty vocabulary
        fits = False
    assert bool(has_tfidf_words([text])[0]) == fits


# -- the workspace and the tracking store ------------------------------------------------------------

@pytest.mark.parametrize("remove, message", [
    (".git", "not a git repository: run `git init && git add -A && git commit`"),
    (".dvc", "not a DVC repository (no .dvc/): run `dvc init`"),
])
@pytest.mark.parametrize("command", [["run", "--no-push"], ["stage", "prepare"]])
def test_a_workspace_without_git_or_dvc_is_refused_up_front(workspace, capsys, no_prefect_server, remove, message,
                                                            command):
    shutil.rmtree(workspace / remove)
    code, error = _refused(capsys, workspace, *command)
    assert (code, error) == (EXIT_BAD_INPUT, f"{workspace.resolve()}: {message}")


@pytest.mark.parametrize("section, key", [(None, "seed"), ("evaluate", "alpha")], ids=["top-level", "nested"])
def test_a_duplicated_params_key_is_refused_with_its_line(workspace, capsys, section, key):
    lines = (workspace / "params.yaml").read_text().splitlines()
    at = lines.index(f"{section}:") + 1 if section else 0
    indent = "  " if section else ""
    lines.insert(at, f"{indent}{key}: 1")  # before the key's own line: that one is the second
    (workspace / "params.yaml").write_text("\n".join(lines) + "\n")
    first, second = at + 1, next(i for i, line in enumerate(lines) if line.startswith(f"{indent}{key}:") and i > at) + 1
    code, error = _refused(capsys, workspace, "run", "--no-push")
    assert (code, error) == (EXIT_BAD_INPUT, f"params.yaml: line {second}: key {key!r} is given twice (first on line "
                                             f"{first}); DVC refuses duplicate keys")


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(8192))


def _torn(path: Path) -> None:
    """A real SQLite file whose second page was overwritten."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, payload TEXT)")
        conn.executemany("INSERT INTO runs (payload) VALUES (?)", [("x" * 500,) for _ in range(200)])
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(np.random.default_rng(1).bytes(8192))


@pytest.mark.parametrize("spoil", [_garbage, _torn], ids=["garbage", "torn-page"])
@pytest.mark.parametrize("where", ["default", "MLFLOW_TRACKING_URI"])
def test_an_unreadable_tracking_store_is_refused_before_any_stage(workspace, capsys, monkeypatch, no_prefect_server,
                                                                  tmp_path, spoil, where):
    db = workspace / registry.DEFAULT_TRACKING_DB
    if where == "MLFLOW_TRACKING_URI":
        db = tmp_path / "elsewhere" / "store.db"
        db.parent.mkdir()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    spoil(db)
    code, error = _refused(capsys, workspace, "run", "--no-push")
    assert code == EXIT_BAD_INPUT
    assert error.startswith(f"{db.resolve()}: the tracking store cannot be read (")
    assert error.endswith("restore it from a backup, or move it and mlartifacts/ aside to start a new registry")


@pytest.fixture(scope="module")
def original_store(tmp_path_factory) -> Path:
    """A workspace's MLflow store as register creates it: experiment `graft`, artifacts beside it."""
    import mlflow

    root = tmp_path_factory.mktemp("original")
    with mock.patch.dict(os.environ):
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        uri = registry.tracking_uri(root)
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("graft", artifact_location=registry.artifact_location(uri))
    (root / registry.DEFAULT_ARTIFACTS / "1").mkdir(parents=True)
    return root


def test_a_copied_workspace_whose_store_points_at_the_original_is_refused(tmp_path, tiny_model_dir, capsys,
                                                                         monkeypatch, no_prefect_server,
                                                                         original_store):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = make_workspace(tmp_path / "copy", tiny_params(tiny_model_dir))
    shutil.copy2(original_store / registry.DEFAULT_TRACKING_DB, copy / registry.DEFAULT_TRACKING_DB)
    shutil.copytree(original_store / registry.DEFAULT_ARTIFACTS, copy / registry.DEFAULT_ARTIFACTS)
    monkeypatch.chdir(copy)
    code, error = _refused(capsys, copy, "run", "--no-push")
    assert code == EXIT_BAD_INPUT
    assert error == (
        f"{(copy / 'mlruns.db').resolve()}: experiment 'graft' keeps its artifacts in "
        f"{(original_store / 'mlartifacts').resolve()}, outside this workspace {copy.resolve()} (a copied or moved "
        "workspace?); run from the original workspace, or move mlruns.db and mlartifacts/ aside to start a new "
        "registry here")
    # the original itself passes
    assert preflight.check_tracking_store(original_store, experiment="graft") is None


def test_a_deleted_store_beside_old_artifacts_is_said_in_one_line(workspace, capsys, monkeypatch, no_prefect_server):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(workspace)
    preflight.check("run", params, workspace)
    assert capsys.readouterr().err == ""  # a fresh workspace: nothing to say
    (workspace / "mlartifacts" / "1" / "abc").mkdir(parents=True)
    (workspace / "mlartifacts" / "1" / "abc" / "meta.yaml").write_text("x")
    preflight.check("run", params, workspace)
    db = (workspace / "mlruns.db").resolve()
    assert capsys.readouterr().err.splitlines() == [
        f"{WARNING_PREFIX}{db} is missing but {db.parent / 'mlartifacts'} holds earlier artifacts: a new registry "
        f"will be created at {db} and model versions restart at 1 (restore mlruns.db to keep the old registry)"]


# -- the Prefect server ------------------------------------------------------------------------------

@pytest.fixture
def closed_port():
    """A loopback port bound by this test and not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_prefect_server_that_is_down_is_transient_and_named(workspace, capsys, monkeypatch, closed_port):
    url = f"http://127.0.0.1:{closed_port}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    code, error = _refused(capsys, workspace, "run", "--no-push")
    assert code == EXIT_TRANSIENT
    assert error.startswith(f"PREFECT_API_URL={url}: the Prefect server does not answer (")
    assert error.endswith("start it, or unset PREFECT_API_URL to run on Prefect's ephemeral API")


def test_a_prefect_server_that_answers_passes():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        preflight.check_prefect_api(f"http://127.0.0.1:{server.server_address[1]}/api")
        preflight.check_prefect_api(f"http://127.0.0.1:{server.server_address[1]}/wrong")  # 404: a server is there
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_refuses_in_a_subprocess_without_a_traceback(workspace, closed_port):
    """The same preflight through the installed entry point, as a user or a scheduler sees it."""
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{closed_port}/api")
    proc = subprocess.run([sys.executable, "-m", "graft.cli", "run", "--no-push"], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_TRANSIENT
    assert "Traceback" not in proc.stderr + proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("graft:")] == [
        line for line in proc.stderr.splitlines() if line.strip()]
