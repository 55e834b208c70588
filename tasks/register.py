"""register: record the pipeline run in MLflow and, when the gate passed, register a new model
version with the alias `challenger` (aliases, never the deprecated stages)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import read_json, write_json
from graft.layout import Layout

_LAYOUT = Layout()
PRETRAINED_DIR = _LAYOUT.pretrained_dir
PREPARED_DIR = _LAYOUT.prepared_dir
FINETUNED_DIR = _LAYOUT.finetuned_dir
BASELINES_DIR = _LAYOUT.baselines_dir


def load_split(name: str, prepared_dir: Path = PREPARED_DIR) -> pd.DataFrame:
    return pd.read_parquet(prepared_dir / f"{name}.parquet")


REPORTS = Path("reports")
OUT = REPORTS / "registration.json"
DEFAULT_TRACKING_DB = Path("mlruns.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")
LOGGED_REPORTS = ("metrics.json", "transfer.json", "gate.json", "train.json", "transferability.json")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (a server at scale), else a SQLite file in the repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_TRACKING_DB.resolve()}"


def flat_params(params: config.Params) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", params.model_dump())
    return flat


def serving_requirements() -> list[str]:
    """Pinned versions of what serving the model needs (MLflow's guess would add torchvision)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "tokenizers", "safetensors")]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def register(params: config.Params, uri: str | None = None) -> dict:
    """Log params, metrics, data digest and reports; register the model if the gate passed."""
    import mlflow
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    r = params.register
    if mlflow.get_experiment_by_name(r.experiment) is None:
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else DEFAULT_ARTIFACTS.resolve().as_uri()
        mlflow.create_experiment(r.experiment, artifact_location=artifacts)
    mlflow.set_experiment(r.experiment)

    metrics, transfer, gate = (read_json(REPORTS / name) for name in ("metrics.json", "transfer.json", "gate.json"))
    card = read_json(PREPARED_DIR / "datacard.json")
    manifest = read_json(PRETRAINED_DIR / "manifest.json")
    with mlflow.start_run() as run:
        mlflow.log_params(flat_params(params))
        for split in ("test", "val"):
            mlflow.log_metrics({f"{split}_{k}": v for k, v in metrics[split].items() if isinstance(v, float)})
        for name, cand in transfer["candidates"].items():
            mlflow.log_metrics({f"test_accuracy_{name}": cand["test"]["accuracy"],
                                f"test_macro_f1_{name}": cand["test"]["macro_f1"]})
        mlflow.log_metric("transfer_margin", transfer["margin"])
        mlflow.set_tags({"negative_transfer": str(transfer["negative_transfer"]), "gate_passed": str(gate["passed"]),
                         "dataset_fingerprint": card["fingerprint"], "data_source": card["source"], "backbone": manifest["source"]["ref"],
                         "git_commit": git_commit() or "unknown"})
        for split in ("train", "val", "test"):
            path = PREPARED_DIR / f"{split}.parquet"
            frame = pd.read_parquet(path, columns=["id", "label"])
            dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()), targets="label", name=split,
                                              digest=card["splits"][split]["fingerprint"][:20])
            mlflow.log_input(dataset, context=split)
        for name in LOGGED_REPORTS:
            if (REPORTS / name).exists():
                mlflow.log_artifact(str(REPORTS / name), artifact_path="reports")
        if (REPORTS / "plots").exists():
            mlflow.log_artifacts(str(REPORTS / "plots"), artifact_path="reports/plots")

        result = {"run_id": run.info.run_id, "experiment": r.experiment, "tracking_uri": uri,
                  "model_name": r.model_name, "registered": False, "version": None, "aliases": []}
        if not gate["passed"]:
            failed = [c["name"] for c in gate["checks"] if not c["passed"]]
            result["reason"] = f"gate failed: {', '.join(failed)}"
            return result
        from graft.modeling import load_classifier, load_tokenizer

        components = {"model": load_classifier(FINETUNED_DIR), "tokenizer": load_tokenizer(FINETUNED_DIR)}
        try:
            info = mlflow.transformers.log_model(
                transformers_model=components, task="text-classification", name="model",
                registered_model_name=r.model_name, await_registration_for=60, pip_requirements=serving_requirements(),
            )
        except Exception as err:  # MLflow raises many types; the user needs the message
            raise GraftError(f"{FINETUNED_DIR}: MLflow could not log or register the model: {err}") from None
        version = str(info.registered_model_version)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.set_registered_model_alias(r.model_name, r.alias, version)
        client.set_model_version_tag(r.model_name, version, "dataset_fingerprint", card["fingerprint"])
        result.update(registered=True, version=version, aliases=[r.alias], model_uri=f"models:/{r.model_name}@{r.alias}")
    return result


@exits_cleanly
def main() -> None:
    result = register(config.load())
    write_json(OUT, result)
    if result["registered"]:
        print(f"register: {result['model_name']} version {result['version']} -> @{result['aliases'][0]} (run {result['run_id']})")  # noqa: T201
    else:
        print(f"register: not registered ({result['reason']}); run {result['run_id']} logged")  # noqa: T201


if __name__ == "__main__":
    main()
