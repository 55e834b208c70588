"""register: record the pipeline run in MLflow; when the gate passed, register a version with
the alias `challenger` and promote it to `champion` if it beats the champion on this run's
test split (aliases, never the deprecated stages)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pandas as pd

from graft import config, registry
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_write_text, read_json, write_json
from graft.layout import SPLITS, Layout, require


def logged_reports(layout: Layout) -> tuple[Path, ...]:
    """The reports register logs to the run. transferability.json, train.json and evaluate.json hold run facts
    (seconds, throughput): the flow logs them afterwards, so that register does not depend on
    them and re-running a stage with nothing changed registers nothing new."""
    return (layout.metrics, layout.transfer, layout.gate, layout.bias, layout.robustness,
            layout.report_html, layout.datacard_md)


def proposed_candidate(layout: Layout) -> tuple[str, Path]:
    """The candidate train proposed on validation and its folder (models/finetuned/candidates.json)."""
    require(layout.candidates, root=layout.root)
    manifest = read_json(layout.candidates)
    return manifest["proposed"], Path(layout.root) / manifest["candidates"][manifest["proposed"]]["path"]


def proposed_model_dir(layout: Layout) -> Path:
    """The folder of the candidate train proposed on validation."""
    return proposed_candidate(layout)[1]


def register(params: config.Params, layout: Layout | None = None, uri: str | None = None) -> dict:
    """Log params, metrics, data digest and reports; when the gate passed, register a version,
    check that the registry serves evaluate's test predictions, then move aliases."""
    import mlflow
    from mlflow import MlflowClient

    layout = layout or Layout()
    require(layout.metrics, layout.transfer, layout.gate, layout.datacard, layout.manifest, root=layout.root)
    uri = uri or registry.tracking_uri(layout.root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    r = params.register
    with registry.registry_lock(uri):  # SQLite allows one writer; aliases move one run at a time
        if mlflow.get_experiment_by_name(r.experiment) is None:
            mlflow.create_experiment(r.experiment, artifact_location=registry.artifact_location(uri))
    mlflow.set_experiment(r.experiment)

    metrics, transfer, gate = (read_json(p) for p in (layout.metrics, layout.transfer, layout.gate))
    bias = read_json(layout.bias) if layout.bias.exists() else None
    card = read_json(layout.datacard)
    manifest = read_json(layout.manifest)
    tags = registry.lineage(datacard=card, manifest=manifest, dvc_lock=Path(layout.root) / "dvc.lock")
    failed = [c for c in gate["checks"] if not c["passed"]]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with mlflow.start_run() as run:
        with registry.registry_lock(uri):
            abandoned = registry.mark_half_registered(client, r.model_name, by_run=run.info.run_id)
        mlflow.log_params(registry.flat_params(params))
        for split in ("test", "val"):
            mlflow.log_metrics({f"{split}_{k}": v for k, v in metrics[split].items() if isinstance(v, float)})
        for name, cand in transfer["candidates"].items():
            mlflow.log_metrics({f"test_accuracy_{name}": cand["test"]["accuracy"],
                                f"test_macro_f1_{name}": cand["test"]["macro_f1"]})
        mlflow.log_metric("transfer_margin", transfer["margin"])
        mlflow.set_tags({**tags, "dataset_fingerprint": card["fingerprint"], "transfer_verdict": registry.verdict_of(transfer),
                         "negative_transfer": str(transfer.get("negative_transfer")), "gate_passed": str(gate["passed"]),
                         "gate_failed_checks": ", ".join(c["name"] for c in failed) or "none",
                         "backbone": manifest["source"]["ref"]})
        for split in SPLITS:
            path = layout.split_file(split)
            frame = pd.read_parquet(path, columns=["id", "label"])
            with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so per split
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
                dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()), targets="label", name=split,
                                                  digest=card["splits"][split]["fingerprint"][:20])
            mlflow.log_input(dataset, context=split)
        for report in logged_reports(layout):
            if report.exists():
                mlflow.log_artifact(str(report), artifact_path="reports")
        if layout.plots_dir.exists():
            mlflow.log_artifacts(str(layout.plots_dir), artifact_path="reports/plots")

        result = {"run_id": run.info.run_id, "experiment": r.experiment, "tracking_uri": uri,
                  "model_name": r.model_name, "registered": False, "version": None, "aliases": [],
                  "lineage": tags, "gate_passed": bool(gate["passed"]), "abandoned_versions": abandoned}
        if not gate["passed"]:
            result["failed_checks"] = failed
            result["reason"] = "gate failed: " + "; ".join(
                f"{c['name']} = {c['value']} (threshold {c['threshold']})" for c in failed)
            return result

        candidate, model_dir = proposed_candidate(layout)
        require(model_dir, layout.test_predictions, root=layout.root)
        test = pd.read_parquet(layout.split_file("test"), columns=["id", "text", "label"])
        texts, labels = test["text"].tolist(), test["label"].tolist()
        expected = read_json(layout.test_predictions)
        registry.check_predictions_fit(expected, path=layout.test_predictions, candidate=candidate,
                                       ids=test["id"].astype(str).tolist(), classes=list(card["classes"]))
        classifier = registry.servable(model_dir)  # a folder that does not say how to serve it stops here
        registry.check_inference_fits(expected, path=layout.test_predictions, model_dir=model_dir,
                                      served=classifier.inference)
        card_text = registry.model_card(name=r.model_name, manifest=manifest, datacard=card, metrics=metrics,
                                        transfer=transfer, gate=gate, bias=bias, lineage_tags=tags)
        with registry.registry_lock(uri), tempfile.TemporaryDirectory() as tmp:
            card_path = Path(tmp) / "model_card.md"  # travels inside the model, not a stage output
            atomic_write_text(card_path, card_text)
            try:
                info = registry.log_model(model_dir=model_dir, card_path=card_path, registered_name=r.model_name,
                                          example_texts=texts[:2], classifier=classifier)
            except Exception as err:  # MLflow raises many types; the user needs the message
                raise GraftError(f"{model_dir}: MLflow could not log or register the model: {err}") from None
            version = str(info.registered_model_version)
            registry.wait_ready(client, r.model_name, version)
            for key, value in tags.items():
                client.set_model_version_tag(r.model_name, version, key, value)
            client.set_model_version_tag(r.model_name, version, "dataset_fingerprint", card["fingerprint"])
            client.update_model_version(r.model_name, version, description=card_text)

            # parity before any alias moves: the version as the registry serves it, on the test split
            version_uri = f"models:/{r.model_name}/{version}"
            served = registry.predict(version_uri, texts)
            check = registry.parity(expected, served, mode=classifier.inference)
            registry.record_parity(client, r.model_name, version, check)
            result["parity"] = check
            if not check["passed"]:
                why = (f"{version_uri} does not serve what evaluate scored ({layout.test_predictions}): "
                       f"{registry.parity_sentence(check)}")
                registry.mark_version(client, r.model_name, version, "refused", why)
                raise registry.ParityError(f"parity check failed: {why}; version {version} is tagged "
                                           f"{registry.STATUS_TAG}=refused and no alias moved")

            new_accuracy = registry.accuracy(served, labels)  # the parity pass's predictions, not a second one
            champion = registry.champion_version(client, r.model_name)
            old_accuracy = (registry.accuracy_of(f"models:/{r.model_name}/{champion}", texts, labels)
                            if champion is not None else None)
            promote, why = registry.decide_promotion(challenger=new_accuracy, champion=old_accuracy,
                                                     verdict=registry.verdict_of(transfer), rule=r.promotion)
            client.set_model_version_tag(r.model_name, version, registry.PROMOTION_TAG, why)
            # checked and tagged before an alias names it: a run killed from here on leaves a usable version
            client.set_model_version_tag(r.model_name, version, registry.STATUS_TAG, "registered")
            client.set_registered_model_alias(r.model_name, r.alias, version)
            aliases = [r.alias]
            if promote:
                client.set_registered_model_alias(r.model_name, registry.CHAMPION, version)
                aliases.append(registry.CHAMPION)
        mlflow.log_metric("registry_test_accuracy", new_accuracy)
        result.update(registered=True, version=version, aliases=aliases, model_uri=f"models:/{r.model_name}@{r.alias}",
                      promotion={"promoted": promote, "reason": why, "test_accuracy": new_accuracy,
                                 "champion_version": champion, "champion_test_accuracy": old_accuracy})
    return result


@exits_cleanly
def main() -> None:
    layout = Layout()
    result = register(config.load(), layout)
    write_json(layout.registration, result)
    for found in result["abandoned_versions"]:
        print(f"register: version {found['version']} was half-registered (its run {found['run_id']} stopped "  # noqa: T201
              f"before it was checked): marked {registry.STATUS_TAG}=abandoned, run ended FAILED")
    if result["registered"]:
        promotion = result["promotion"]
        print(f"register: {result['model_name']} version {result['version']} -> @{', @'.join(result['aliases'])} "  # noqa: T201
              f"(run {result['run_id']}); {'promoted' if promotion['promoted'] else 'not promoted'}: {promotion['reason']}")
        check = result["parity"]
        print(f"register: parity: the registry serves evaluate's predictions: {registry.parity_sentence(check)}")  # noqa: T201
    else:
        print(f"register: not registered ({result['reason']}); run {result['run_id']} logged")  # noqa: T201


if __name__ == "__main__":
    main()
