"""Served = evaluated: for every strategy, the version register logs, loaded back from the
registry (`mlflow.pyfunc.load_model`) and served over HTTP (`mlflow models serve`), gives
evaluate's test predictions row for row; a model folder served differently from how it was
scored is refused before any alias moves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from graft import registry, servers
from graft.errors import GraftError
from graft.files import read_json, write_json
from graft.layout import Layout
from graft.serving import SERVING_FILE, ServingDescriptionError, TextClassifier
from tasks.evaluate import evaluate
from tasks.register import main as register_stage
from tasks.register import register

from .conftest import ALL_STRATEGIES, load_params

NAME = "graft-classifier"


@pytest.fixture(scope="module")
def registered(all_strategies_evaluated: Path, tmp_path_factory) -> dict:
    """Each strategy proposed in turn (as train would, had it won on validation), evaluated, and
    registered into one registry: {strategy: (version, evaluate's test predictions)}."""
    import mlflow

    base = tmp_path_factory.mktemp("parity")
    root = base / "ws"
    shutil.copytree(all_strategies_evaluated, root, symlinks=True)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    layout, versions = Layout(root), {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow exports both; put them back after
            patch.setenv(key, uri)
        params = load_params(root)
        for strategy in ALL_STRATEGIES:
            manifest = read_json(layout.candidates)
            write_json(layout.candidates, {**manifest, "proposed": strategy})
            evaluate(params)
            result = register(params, layout, uri=uri)
            versions[strategy] = {"version": result["version"], "parity": result["parity"],
                                  "expected": read_json(layout.test_predictions)}
        mlflow.set_tracking_uri(None)
    test = pd.read_parquet(root / "data/prepared/test.parquet")
    return {"root": root, "uri": uri, "versions": versions, "texts": test["text"].tolist()}


def test_every_strategy_loaded_from_the_registry_gives_evaluates_predictions(registered: dict, record_property):
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    for strategy, entry in registered["versions"].items():
        expected = entry["expected"]
        assert expected["candidate"] == strategy
        assert entry["parity"]["passed"] and entry["parity"]["rows"] == len(registered["texts"])
        served = mlflow.pyfunc.load_model(f"models:/{NAME}/{entry['version']}").predict(
            pd.DataFrame({"text": registered["texts"]}))
        check = registry.parity(expected, served)
        assert served["label"].tolist() == expected["labels"], strategy
        assert check["passed"], (strategy, check)
        record_property(f"pyfunc_max_probability_difference_{strategy}", check["max_probability_difference"])


@pytest.mark.servers
def test_every_strategy_served_over_http_gives_evaluates_predictions(registered: dict, tmp_path: Path,
                                                                      record_property):
    # the venv's bin first: `mlflow models serve` starts `uvicorn` by name, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=registered["uri"], MLFLOW_REGISTRY_URI=registered["uri"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in registered["texts"]]}}).encode()
    for strategy, entry in registered["versions"].items():
        port = servers.free_port()
        log = tmp_path / f"serve-{strategy}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                     f"models:/{NAME}/{entry['version']}", "--env-manager", "local",
                                     "--host", "127.0.0.1", "--port", str(port)],
                                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            servers.wait_http(f"http://127.0.0.1:{port}/ping", proc, 180, "mlflow models serve")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                served = pd.DataFrame(json.loads(response.read())["predictions"])
        finally:
            servers.stop(proc)
        check = registry.parity(entry["expected"], served)
        assert served["label"].tolist() == entry["expected"]["labels"], strategy
        assert check["passed"], (strategy, check, log.read_text()[-2000:])
        record_property(f"http_max_probability_difference_{strategy}", check["max_probability_difference"])


def aliases(uri: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def test_a_model_served_with_another_max_length_is_refused_with_exit_2_and_no_alias_moves(
        registered: dict, tmp_path: Path, monkeypatch, capsys):
    from mlflow import MlflowClient

    root = tmp_path / "ws"
    shutil.copytree(registered["root"], root, symlinks=True)
    layout = Layout(root)
    proposed = read_json(layout.candidates)["proposed"]
    description_file = root / "models/finetuned" / proposed / SERVING_FILE
    # planted after evaluate: serving would truncate at 4 tokens where evaluate used model.max_length
    description = read_json(description_file)
    write_json(description_file, {**description, "max_length": 4})
    before = aliases(registered["uri"])
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    with pytest.raises(SystemExit) as stopped:
        register_stage()  # the stage's command line: python -m tasks.register
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graft: error:")]
    assert len(errors) == 1 and errors[0].startswith("graft: error: parity check failed: models:/graft-classifier/")
    assert "tolerance 0.0001" in errors[0] and "no alias moved" in errors[0]
    assert aliases(registered["uri"]) == before
    assert not layout.registration.exists()

    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    newest = max(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    refused = client.get_model_version(NAME, newest.version)
    assert refused.tags["graft_status"] == "refused" and refused.tags["parity_passed"] == "False"
    assert refused.description.startswith("**REFUSED, do not use**")
    run = client.get_run(refused.run_id)
    assert run.info.status == "FAILED"
    assert float(run.data.metrics["parity_max_probability_difference"]) > registry.PARITY_TOLERANCE


def test_a_model_folder_without_its_serving_description_is_refused_not_guessed(registered: dict, tmp_path: Path,
                                                                                monkeypatch):
    from mlflow import MlflowClient

    root = tmp_path / "ws"
    shutil.copytree(registered["root"], root, symlinks=True)
    monkeypatch.chdir(root)
    proposed = read_json(Layout(root).candidates)["proposed"]
    (root / "models/finetuned" / proposed / SERVING_FILE).unlink()
    with pytest.raises(ServingDescriptionError, match=f"{SERVING_FILE}: missing"):
        TextClassifier().load(root / "models/finetuned" / proposed)
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    count = len(client.search_model_versions(f"name='{NAME}'"))
    with pytest.raises(GraftError, match=f"{SERVING_FILE}: missing: this model folder does not say how it was scored"):
        register(load_params(root), Layout(root), uri=registered["uri"])
    assert len(client.search_model_versions(f"name='{NAME}'")) == count  # nothing registered
