"""Where every artifact lives: each path is written here once, relative to the repository root.

Stage functions take their inputs and outputs as arguments; a stage's `main()` passes the paths
of `Layout()` (the current directory), and tests pass `Layout(tmp_path)`. No module in `tasks/`
imports another stage module to learn where something is. `dvc.yaml` names the same paths and
says which stage writes each (read by `produced_by`); `tests/test_dvc_contract.py` checks that
the two agree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from graft.errors import GraftError


@dataclass(frozen=True)
class Layout:
    """The pipeline's artifact paths under `root`."""

    root: Path = Path(".")

    def _p(self, relative: str) -> Path:
        return Path(self.root) / relative

    # resolved sources: written by `graft sources` (and `graft run`), read by dvc.yaml's `vars`,
    # so DVC hashes the bytes behind data.source and model.ref
    @property
    def data_source_file(self) -> Path:
        return self._p("data/source.yaml")

    @property
    def model_source_file(self) -> Path:
        return self._p("models/source.yaml")

    # prepare
    @property
    def raw_dir(self) -> Path:
        """The bytes `prepare` read from `data.source`: a DVC-cached snapshot."""
        return self._p("data/raw")

    @property
    def unlabelled_raw_dir(self) -> Path:
        """The bytes read from `data.unlabelled_source` (inside raw_dir, so cached with it)."""
        return self.raw_dir / "unlabelled"

    @property
    def prepared_dir(self) -> Path:
        return self._p("data/prepared")

    @property
    def unlabelled_file(self) -> Path:
        """Unlabelled target-domain texts (id, text), none of them in a labelled split."""
        return self.prepared_dir / "unlabelled.parquet"

    def split_file(self, split: str) -> Path:
        return self.prepared_dir / f"{split}.parquet"

    @property
    def datacard(self) -> Path:
        return self.prepared_dir / "datacard.json"

    @property
    def rows_index(self) -> Path:
        """Every validated row: id, label, split (what `graft data` diffs against)."""
        return self.prepared_dir / "rows.parquet"

    @property
    def datacard_md(self) -> Path:
        return self._p("reports/datacard.md")

    @property
    def data_report(self) -> Path:
        return self._p("reports/data.json")

    # fetch
    @property
    def candidates_dir(self) -> Path:
        """Every candidate backbone (model.ref first, then model.candidates), one folder each."""
        return self._p("models/candidates")

    @property
    def candidates_index(self) -> Path:
        """The candidates in order: folder name and ref."""
        return self.candidates_dir / "index.json"

    # select
    @property
    def pretrained_dir(self) -> Path:
        """THE backbone: the chosen candidate, which features, train, evaluate and register use."""
        return self._p("models/pretrained")

    @property
    def manifest(self) -> Path:
        """The backbone's files, architecture and the selection (ranking, freezing depth)."""
        return self.pretrained_dir / "manifest.json"

    @property
    def transferability(self) -> Path:
        """Per candidate, per layer, per score, with seconds (run facts: nothing depends on it)."""
        return self._p("reports/transferability.json")

    @property
    def transferability_plot(self) -> Path:
        return self._p("reports/plots/transferability.png")

    # features
    @property
    def features_dir(self) -> Path:
        return self._p("data/features")

    def features_file(self, split: str) -> Path:
        return self.features_dir / f"{split}.npy"

    @property
    def recipe(self) -> Path:
        """The max_length (resolved when `auto`) and truncation the features stage embedded with:
        train and evaluate read it (graft.lengths.resolved_tokenization), never model.max_length."""
        return self.features_dir / RECIPE_FILE

    @property
    def unlabelled_features(self) -> Path:
        return self.features_dir / "unlabelled.npy"

    # adapt
    @property
    def adapted_dir(self) -> Path:
        """The backbone after masked-LM continued pretraining (a plain model folder + tokenizer)."""
        return self._p("models/adapted")

    @property
    def adapted_state(self) -> Path:
        """What the adapt stage did (method, texts, head initialised): deterministic, no run facts."""
        return self.adapted_dir / "adapt.json"

    @property
    def adapt_report(self) -> Path:
        """adapt's run facts (seconds, losses): no stage depends on them."""
        return self._p("reports/adapt.json")

    @property
    def sequence_length(self) -> Path:
        """The train split's token lengths, the max_length chosen or given, and its cost."""
        return self._p("reports/sequence_length.json")

    @property
    def inference_report(self) -> Path:
        """Which inference mode the features stage chose and why (graft.inference)."""
        return self._p("reports/inference.json")

    @property
    def token_lengths_plot(self) -> Path:
        return self._p("reports/plots/token_lengths.png")

    def run_fact_reports(self) -> tuple[Path, ...]:
        """What the flow logs to register's MLflow run afterwards, each when it exists: reports of
        stages register does not depend on (run facts, or optional stages' findings)."""
        return (self.transferability, self.transferability_plot, self.sequence_length, self.token_lengths_plot,
                self.inference_report,
                self.adapt_report, self.adaptation, self.curve_report, self.domain_report, self.train_report,
                self.evaluate_report)

    # train
    @property
    def finetuned_dir(self) -> Path:
        return self._p("models/finetuned")

    @property
    def candidates(self) -> Path:
        """What train produced: each candidate's kind, folder and role, and the one proposed on
        validation (deterministic: evaluate and register depend on it, not on run facts)."""
        return self.finetuned_dir / "candidates.json"

    @property
    def val_predictions(self) -> Path:
        """Each transformer candidate's validation probabilities from its best epoch (with the
        val row ids): evaluate reuses them instead of predicting validation again."""
        return self.finetuned_dir / "val_predictions.npz"

    @property
    def seed_models_dir(self) -> Path:
        """The proposed strategy trained again with other seeds (train.seeds > 1): scored on test
        by evaluate for the seed spread, never registered (the base seed's folder is)."""
        return self.finetuned_dir / "seeds"

    def seed_model_dir(self, seed: int) -> Path:
        return self.seed_models_dir / f"seed-{seed}"

    @property
    def checkpoints_dir(self) -> Path:
        """Resume state of the train stage: git-ignored, in .dvcignore, never a DVC output."""
        return self._p("models/checkpoints")

    @property
    def baselines_dir(self) -> Path:
        return self._p("models/baselines")

    @property
    def train_report(self) -> Path:
        return self._p("reports/train.json")

    # evaluate
    @property
    def reports_dir(self) -> Path:
        return self._p("reports")

    @property
    def plots_dir(self) -> Path:
        return self._p("reports/plots")

    @property
    def metrics(self) -> Path:
        return self._p("reports/metrics.json")

    @property
    def transfer(self) -> Path:
        return self._p("reports/transfer.json")

    @property
    def bias(self) -> Path:
        return self._p("reports/bias.json")

    @property
    def robustness(self) -> Path:
        return self._p("reports/robustness.json")

    @property
    def gate(self) -> Path:
        return self._p("reports/gate.json")

    @property
    def report_html(self) -> Path:
        return self._p("reports/report.html")

    @property
    def evaluate_report(self) -> Path:
        """evaluate's run facts (seconds, forward passes per model): no stage depends on them, so
        evaluating the same models again changes nothing that register reads."""
        return self._p("reports/evaluate.json")

    @property
    def adaptation(self) -> Path:
        """Each adaptation method's verdict against the same strategy without adapting."""
        return self._p("reports/adaptation.json")

    @property
    def test_predictions(self) -> Path:
        """The proposed candidate's test predictions as evaluate scored them (row ids, labels,
        probabilities per class): what register checks the served model against."""
        return self._p("reports/test_predictions.json")

    # curve (optional: a stub when curve.enabled is false)
    @property
    def curve_report(self) -> Path:
        return self._p("reports/curve.json")

    @property
    def curve_plot(self) -> Path:
        return self._p("reports/plots/curve.png")

    # domain (a stub unless data.domain_column and domain.target are set)
    @property
    def domain_report(self) -> Path:
        return self._p("reports/domain.json")

    @property
    def domain_plot(self) -> Path:
        return self._p("reports/plots/domain.png")

    # register
    @property
    def registration(self) -> Path:
        return self._p("reports/registration.json")


SPLITS = ("train", "val", "test")
RECIPE_FILE = "recipe.json"

PIPELINE_FILE = "dvc.yaml"


@functools.lru_cache(maxsize=8)
def produced_by(root: Path = Path(".")) -> dict[str, str]:
    """Which stage writes what, read from dvc.yaml's outs, metrics and plots (the one list of a
    stage's outputs), so a missing input can name the stage to run first."""
    path = Path(root) / PIPELINE_FILE
    if not path.exists():
        path = Path(__file__).resolve().parents[1] / PIPELINE_FILE  # the checkout graft runs from
    if not path.exists():
        return {}
    with open(path) as handle:
        stages = (yaml.safe_load(handle) or {}).get("stages", {})
    return {next(iter(out)) if isinstance(out, dict) else str(out): name
            for name, spec in stages.items() for kind in ("outs", "metrics", "plots") for out in spec.get(kind) or []}


def require(*paths: Path, root: Path | None = None) -> None:
    """Fail with one line naming the stage to run first when an input does not exist yet."""
    for path in paths:
        if Path(path).exists():
            continue
        relative = Path(path)
        if root is not None:
            try:
                relative = Path(path).relative_to(root)
            except ValueError:
                pass
        name = relative.as_posix()
        stage = next((s for out, s in produced_by(Path(root or ".")).items()
                      if name == out or name.startswith(out.rstrip("/") + "/")), None)
        hint = f"; run the {stage!r} stage first (graft stage {stage})" if stage else ""
        raise GraftError(f"{path}: input not found{hint}")
