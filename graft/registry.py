"""The MLflow registry side of graft: where runs are tracked, what a version carries (lineage,
model card, a pyfunc model that needs no network), and champion/challenger promotion.

Promotion compares the new version with the current champion on the same frozen test split,
both predicted in this run through the registry (`models:/...`), so the decision never rests
on numbers another run computed on other data. Aliases move only after the version they name
exists, under a lock, so two runs finishing together cannot both become champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from graft import config
from graft.errors import GraftError


class ParityError(GraftError):
    """The model served from the registry does not give the predictions evaluate scored."""

# How far a served probability may be from evaluate's and still count as the same model: both
# run the same weights in fp32 on the same tokens; batch composition and padding only move the
# float rounding (measured below 1e-6 on the tiny test model), while a different head, max_length
# or truncation moves probabilities by 1e-2 and more.
PARITY_TOLERANCE = 1e-4
# In bf16 and int8 a row's outputs depend on the batch it is scored in, not only on its tokens:
# oneDNN picks its bf16 GEMM blocking by the batch's rows x padded length (measured: the same
# texts padded to 112, 128 or 144 tokens, or alone, give embeddings 1.5e-3 apart), and int8's
# per-sequence scales (graft/precision.py) keep its GEMMs batch-invariant, but a rounding step
# turns fp32's 1e-7 batch noise in the layers around them into a whole int8 level now and then. Rescoring 800 kitchen reviews through all-MiniLM-L6-v2 (256 tokens) with
# a logistic head in request-order batches of 64 instead of length-sorted ones moved bf16
# probabilities by at most 0.005 / 0.011 / 0.021 (mean 4e-4 / 7e-4 / 9e-4) at C = 1 / 10 / 100,
# and 1-2 of 800 labels flipped at near-ties; int8 at most 0.082 / 0.056 / 0.114 (mean 3e-4 / 4e-4). A
# different head on the same data moves them by 0.18 (mean 0.034); max_length 128 instead of 256
# by 0.70 (mean 0.028). So a reduced-precision mode is checked on both the largest and the mean
# difference, and a label may differ only at a tie: a row whose evaluated probabilities of the two
# labels are within the mode's largest difference. mode -> (largest, mean).
PARITY_TOLERANCES = {"fp32": (PARITY_TOLERANCE, PARITY_TOLERANCE), "bf16": (5e-2, 5e-3), "int8": (2e-1, 1e-2),
                     "bf16_compiled": (5e-2, 5e-3)}  # bf16 weights, so bf16's rounding by batch shape
# graft's verdict on a version: registered (checked, aliases may name it), refused (served
# predictions differ from evaluate's), abandoned (its register run stopped before checking it)
STATUS_TAG = "graft_status"
PROMOTION_TAG = "promotion"

DEFAULT_TRACKING_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
CHAMPION = "champion"
SERVING_CODE = Path(__file__).with_name("serving.py")
# what serving.py imports besides its pinned packages, logged beside it (MLflow puts them on sys.path)
SERVING_CODE_PATHS = [Path(__file__).with_name("truncation.py"), Path(__file__).with_name("precision.py")]
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")


def tracking_uri(root: Path = Path(".")) -> str:
    """`MLFLOW_TRACKING_URI` when set (a server at scale), else a SQLite file in the repository.

    graft sets the variable for stages it runs in a DVC experiment's temporary copy, so their
    runs land in the workspace's `mlruns.db`, not in a copy that is deleted afterwards."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / DEFAULT_TRACKING_DB).resolve()}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`mlartifacts/`); a server decides for itself."""
    db = _sqlite_file(uri)
    return (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri() if db else None


@contextlib.contextmanager
def registry_lock(uri: str) -> Iterator[None]:
    """Serialise alias changes (and SQLite writes) of concurrent runs on this machine."""
    db = _sqlite_file(uri)
    path = db.with_name(db.name + ".lock") if db else Path.home() / ".cache" / "graft" / (
        "registry-" + hashlib.sha256(uri.encode()).hexdigest()[:16] + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def flat_params(params: config.Params) -> dict[str, str]:
    """`{"train.lr": "0.0001", ...}`: what MLflow logs, one entry per params.yaml key."""
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
    """Pinned versions of what serving needs (MLflow's own guess would add torchvision)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def lineage(*, datacard: dict, manifest: dict, dvc_lock: Path) -> dict[str, str]:
    """What a version was made from: code, pipeline state, data, backbone, and the Prefect run."""
    files = manifest.get("files", {})
    backbone_digest = hashlib.sha256(
        "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files)).encode()).hexdigest()
    source = manifest.get("source", {})
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)),
        "dvc_lock_sha256": hashlib.sha256(dvc_lock.read_bytes()).hexdigest() if dvc_lock.exists() else "none",
        "data_fingerprint": datacard["fingerprint"],
        "data_source": datacard.get("source", "unknown"),
        "backbone_source": backbone_source(source),
        "backbone_sha256": backbone_digest,
        "prefect_flow_run_id": flow_run_id() or "none",
    }


def backbone_source(source: dict) -> str:
    """`kind:ref[@commit]` of the manifest's source, the kind written once (a package ref already
    starts with `package:`)."""
    kind, ref = source.get("kind", "?"), str(source.get("ref", "?"))
    where = ref if ref.startswith(f"{kind}:") else f"{kind}:{ref}"
    return where + (f"@{source['commit']}" if source.get("commit") else "")


def flow_run_id() -> str | None:
    """The Prefect flow run that started this stage: passed down by the flow, or Prefect's own."""
    return os.environ.get("GRAFT_FLOW_RUN_ID") or os.environ.get("PREFECT__FLOW_RUN_ID") or None


def verdict_of(transfer: dict) -> str:
    """`positive` / `no_gain` / `negative`; older reports only carry `negative_transfer`."""
    if transfer.get("verdict"):
        return str(transfer["verdict"])
    return "negative" if transfer.get("negative_transfer") else "positive"


def model_card(*, name: str, manifest: dict, datacard: dict, metrics: dict, transfer: dict, gate: dict,
               bias: dict | None, lineage_tags: dict) -> str:
    """A Markdown card a person reads before using the model: what, from what, how good, caveats."""
    test = metrics["test"]
    proposed = transfer.get("proposed", "finetune")
    cand = transfer.get("candidates", {}).get(proposed, {}).get("test", {})
    lines = [f"# {name}", "", "Text classifier fine-tuned by graft from a pretrained encoder.", "",
             "## Base model", "",
             f"- source: `{lineage_tags['backbone_source']}` (sha256 of its files: `{lineage_tags['backbone_sha256'][:16]}…`)",
             f"- architecture: {manifest.get('architecture', {}).get('model_type', '?')}, "
             f"{manifest.get('architecture', {}).get('num_parameters', '?')} parameters", "",
             "## Data", "",
             f"- source: `{datacard.get('source')}`, fingerprint `{datacard['fingerprint'][:16]}…`",
             f"- classes: {', '.join(datacard.get('classes', []))}"]
    for split, info in datacard.get("splits", {}).items():
        lines.append(f"- {split}: {info['rows']} rows")
    lines += ["", f"## Test metrics ({transfer.get('confidence', 0.95):.0%} intervals)", ""]
    for key in ("accuracy", "macro_f1"):
        ci = cand.get(f"{key}_ci")
        interval = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        lines.append(f"- {key}: {test[key]:.4f}{interval}")
    lines += ["", "## Transfer", "", f"- verdict: {verdict_of(transfer)}; margin over "
              f"{transfer.get('best_baseline', '?')}: {transfer.get('margin', float('nan')):+.4f}"]
    lines += ["", "## Gate", ""] + [
        f"- {'pass' if c['passed'] else 'FAIL'} {c['name']}: {c['value']} (threshold {c['threshold']})"
        for c in gate.get("checks", [])]
    lines += ["", "## Bias", ""]
    lines += ([f"```json\n{json.dumps(bias, indent=1, sort_keys=True)[:4000]}\n```"] if bias else
              ["No bias report was produced for this run (reports/bias.json absent)."])
    lines += ["", "## Limitations", "",
              "- Trained on a small labelled set; metrics come from one frozen test split of the same source.",
              "- Texts longer than the model's maximum length are truncated.",
              "- Only the classes listed above can be predicted; out-of-domain text still gets one of them.",
              "", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in sorted(lineage_tags.items())]
    return "\n".join(lines) + "\n"


def servable(model_dir: Path) -> Any:
    """The model folder loaded as the registry will serve it (graft.serving.TextClassifier); a
    folder whose serving description is missing or wrong is refused with its file named."""
    from graft.serving import ServingDescriptionError, TextClassifier

    try:
        return TextClassifier().load(model_dir)
    except ServingDescriptionError as err:
        raise GraftError(str(err)) from None


def log_model(*, model_dir: Path, card_path: Path, example_texts: list[str], registered_name: str,
              classifier: Any = None) -> Any:
    """Log the pyfunc model (code + safetensors folder, nothing pickled) and register a version.

    The signature comes from predicting the input example in this process (with `classifier`,
    the folder already loaded by `servable`); MLflow never looks up a hub model card, so
    registering needs no network."""
    import mlflow
    from mlflow.models import infer_signature

    example = pd.DataFrame({"text": example_texts})
    output = (classifier or servable(model_dir)).predict(None, example)
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(SERVING_CODE), code_paths=[str(p) for p in SERVING_CODE_PATHS],
        artifacts={"model": str(model_dir), "model_card": str(card_path)},
        signature=infer_signature(example, output), input_example=example,
        pip_requirements=serving_requirements(), registered_model_name=registered_name,
        await_registration_for=60,
    )


def predict(model_uri: str, texts: list[str]) -> pd.DataFrame:
    """A registered model's predictions of these texts, made now through the registry."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": texts}))


def accuracy(predicted: pd.DataFrame, labels: list[str]) -> float:
    return float((predicted["label"].astype(str).to_numpy() == pd.Series(labels).astype(str).to_numpy()).mean())


def accuracy_of(model_uri: str, texts: list[str], labels: list[str]) -> float:
    """Accuracy of a registered model on these texts, predicted now through the registry."""
    return accuracy(predict(model_uri, texts), labels)


def check_predictions_fit(expected: dict, *, path: Path, candidate: str, ids: list[str], classes: list[str]) -> None:
    """evaluate's test predictions are for this candidate, this test split and these classes."""
    try:
        found = (expected["candidate"], list(expected["ids"]), list(expected["classes"]))
        rows = (len(expected["labels"]), len(expected["probabilities"]))
    except (KeyError, TypeError) as err:
        raise GraftError(f"{path}: missing key {err}; run the 'evaluate' stage again") from None
    if found[0] != candidate:
        raise GraftError(f"{path}: predictions of {found[0]!r}, but train proposed {candidate!r}; "
                         "run the 'evaluate' stage again")
    if found[1] != ids or rows != (len(ids), len(ids)):
        raise GraftError(f"{path}: {len(found[1])} rows whose ids are not the test split's {len(ids)}; "
                         "run the 'evaluate' stage again")
    if found[2] != classes:
        raise GraftError(f"{path}: classes {found[2]}, but the datacard has {classes}; run the 'evaluate' stage again")


def check_inference_fits(expected: dict, *, path: Path, model_dir: Path, served: str) -> None:
    """The folder is served in the inference mode evaluate scored in (predictions written before
    the mode was recorded were scored in fp32)."""
    scored = expected.get("inference", "fp32")
    if scored != served:
        raise GraftError(f"{path}: evaluate scored in inference mode {scored!r}, but {model_dir} is served in "
                         f"{served!r}; run the 'train' and 'evaluate' stages again")


def parity(expected: dict, served: pd.DataFrame, *, mode: str = "fp32") -> dict:
    """Row by row, the served model's test predictions against evaluate's, both in inference
    `mode`: how many labels differ (and how many of those are ties within the mode's rounding),
    and the largest and the mean absolute difference of a class probability."""
    import numpy as np

    from graft.serving import probability_column

    if mode not in PARITY_TOLERANCES:
        raise GraftError(f"parity: inference mode {mode!r}, expected one of {', '.join(PARITY_TOLERANCES)}")
    tolerance, mean_tolerance = PARITY_TOLERANCES[mode]
    ids, classes = list(expected["ids"]), list(expected["classes"])
    columns = [probability_column(c) for c in classes]
    result = {"rows": len(ids), "mode": mode, "tolerance": tolerance, "mean_tolerance": mean_tolerance,
              "labels_differ": len(ids), "ties": 0, "max_probability_difference": None,
              "mean_probability_difference": None, "max_difference_row": None, "differing_rows": ids[:5]}
    missing = [c for c in ["label", *columns] if c not in served.columns]
    if missing or len(served) != len(ids):
        result.update(passed=False, reason=f"served output has {len(served)} rows, columns missing: {missing}")
        return result
    served_labels = served["label"].astype(str).to_numpy()
    differ = np.flatnonzero(served_labels != np.asarray(expected["labels"], dtype=str))
    evaluated = np.asarray(expected["probabilities"], dtype=np.float64).reshape(len(ids), len(classes))
    gaps = np.abs(served[columns].to_numpy(dtype=np.float64) - evaluated)
    worst = gaps.max(axis=1) if len(ids) else np.zeros(0)
    largest, mean = (float(worst.max()), float(gaps.mean())) if len(ids) else (0.0, 0.0)
    # a tie: evaluate gave the served label a probability within `tolerance` of the label it chose
    position = {str(c): i for i, c in enumerate(classes)}
    served_column = np.array([position.get(label, -1) for label in served_labels[differ]], dtype=int)
    ties = [i for i, j in zip(differ, served_column, strict=True)
            if j >= 0 and evaluated[i].max() - evaluated[i, j] <= tolerance]
    result.update(labels_differ=int(len(differ)), ties=len(ties), max_probability_difference=largest,
                  mean_probability_difference=mean, max_difference_row=ids[int(worst.argmax())] if len(ids) else None,
                  differing_rows=[ids[i] for i in differ[:5]],
                  passed=len(differ) == len(ties) and largest <= tolerance and mean <= mean_tolerance)
    return result


def parity_sentence(check: dict) -> str:
    if check.get("reason"):
        return check["reason"]
    largest = check["max_probability_difference"]
    ties = f", {check['ties']} of them ties within the tolerance" if check.get("ties") else ""
    mean = (f"; mean {check['mean_probability_difference']:.2g} (tolerance {check['mean_tolerance']:g})"
            if check.get("mode", "fp32") != "fp32" else "")
    return (f"{check['labels_differ']} of {check['rows']} test rows get another label"
            + (f" (first: {', '.join(check['differing_rows'])})" if check["labels_differ"] else "") + ties
            + f", largest probability difference {largest:.3g} (row {check['max_difference_row']}; "
            f"tolerance {check['tolerance']:g}{' in ' + check['mode'] if check.get('mode', 'fp32') != 'fp32' else ''})"
            + mean)


def record_parity(client, name: str, version: str, check: dict) -> None:
    """The parity result on the version (tags) and on the active MLflow run (tags and metrics)."""
    import mlflow

    values = {"parity_passed": str(check["passed"]), "parity_rows": str(check["rows"]),
              "parity_labels_differ": str(check["labels_differ"]), "parity_ties": str(check["ties"]),
              "parity_mode": str(check["mode"]), "parity_tolerance": str(check["tolerance"]),
              "parity_max_probability_difference": str(check["max_probability_difference"]),
              "parity_mean_probability_difference": str(check["mean_probability_difference"])}
    for key, value in values.items():
        client.set_model_version_tag(name, version, key, value)
    mlflow.set_tags(values)
    mlflow.log_metrics({k: float(check[k.removeprefix("parity_")]) for k in
                        ("parity_rows", "parity_labels_differ", "parity_ties", "parity_tolerance",
                         "parity_max_probability_difference", "parity_mean_probability_difference")
                        if check[k.removeprefix("parity_")] is not None})


def mark_version(client, name: str, version: str, status: str, why: str) -> None:
    """Tag a version that must not be used and put the reason first in its description."""
    client.set_model_version_tag(name, version, STATUS_TAG, status)
    client.set_model_version_tag(name, version, f"{status}_reason", why[:4000])
    old = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"**{status.upper()}, do not use**: {why}\n\n{old}")


def mark_half_registered(client, name: str, *, by_run: str) -> list[dict]:
    """Versions of `name` that a register run left half-registered (stopped after MLflow created
    the version, before graft checked and tagged it): marked `abandoned`, their runs ended FAILED.

    Call it under `registry_lock`: a register run holds the lock from creating its version until
    the version carries `graft_status`, so a version without it (and without the `promotion`
    tag every finished version of older graft carries) was left by a run that died. Across
    machines sharing a tracking server the lock is per machine."""
    found = []
    for v in client.search_model_versions(f"name='{name}'"):
        tags = client.get_model_version(name, v.version).tags
        if STATUS_TAG in tags or PROMOTION_TAG in tags:
            continue
        run_status = None
        if v.run_id:
            run = client.get_run(v.run_id)
            run_status = run.info.status
            if run_status == "RUNNING":
                client.set_terminated(v.run_id, status="FAILED")
                client.set_tag(v.run_id, "graft_abandoned_by_run", by_run)
        why = (f"half-registered: its register run {v.run_id} stopped before graft checked it (parity, "
               f"lineage, model card, aliases); found by run {by_run}")
        mark_version(client, name, str(v.version), "abandoned", why)
        found.append({"version": str(v.version), "run_id": v.run_id, "run_status_was": run_status,
                      "aliases": list(getattr(v, "aliases", []) or [])})
    return found


def champion_version(client, name: str) -> str | None:
    """The version the champion alias names, if it names one that exists."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def decide_promotion(*, challenger: float, champion: float | None, verdict: str,
                     rule: config.PromotionParams) -> tuple[bool, str]:
    """Champion only for a first version, or one that beats the champion by the margin; both
    accuracies measured in this run on the same test split. Returns (promote, why)."""
    if verdict not in rule.verdicts:
        return False, f"transfer verdict {verdict!r} is not one of {list(rule.verdicts)}"
    if champion is None:
        return True, "first version to pass the gate"
    gain = challenger - champion
    if gain > rule.min_gain:
        return True, f"test accuracy {challenger:.4f} beats champion's {champion:.4f} by {gain:+.4f} (> {rule.min_gain})"
    return False, f"test accuracy {challenger:.4f} vs champion's {champion:.4f}: gain {gain:+.4f} is not > {rule.min_gain}"


def wait_ready(client, name: str, version: str, timeout: float = 60) -> None:
    """An alias may only name a version whose files are in place (status READY)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise GraftError(f"model {name} version {version}: registration did not complete ({status})")
        time.sleep(0.5)
