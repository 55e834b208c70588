"""Where every artifact lives: each path is written here once, relative to the repository root.

Stage functions take their inputs and outputs as arguments; a stage's `main()` passes the paths
of `Layout()` (the current directory), and tests pass `Layout(tmp_path)`. No module in `tasks/`
imports another stage module to learn where something is. `dvc.yaml` names the same paths;
`tests/test_dvc_contract.py` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    def prepared_dir(self) -> Path:
        return self._p("data/prepared")

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
    def pretrained_dir(self) -> Path:
        return self._p("models/pretrained")

    @property
    def manifest(self) -> Path:
        return self.pretrained_dir / "manifest.json"

    # features
    @property
    def features_dir(self) -> Path:
        return self._p("data/features")

    def features_file(self, split: str) -> Path:
        return self.features_dir / f"{split}.npy"

    @property
    def transferability(self) -> Path:
        return self._p("reports/transferability.json")

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
    def test_predictions(self) -> Path:
        """The proposed candidate's test predictions as evaluate scored them (row ids, labels,
        probabilities per class): what register checks the served model against."""
        return self._p("reports/test_predictions.json")

    # register
    @property
    def registration(self) -> Path:
        return self._p("reports/registration.json")


SPLITS = ("train", "val", "test")

# Which stage writes what, so a missing input can name the stage to run first.
PRODUCED_BY = {
    "data/raw": "prepare",
    "data/prepared": "prepare",
    "models/pretrained": "fetch",
    "data/features": "features",
    "reports/transferability.json": "features",
    "models/finetuned": "train",
    "models/baselines": "train",
    "reports/train.json": "train",
    "reports/metrics.json": "evaluate",
    "reports/transfer.json": "evaluate",
    "reports/gate.json": "evaluate",
    "reports/bias.json": "evaluate",
    "reports/robustness.json": "evaluate",
    "reports/test_predictions.json": "evaluate",
}


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
        stage = next((s for prefix, s in PRODUCED_BY.items() if relative.as_posix().startswith(prefix)), None)
        hint = f"; run the {stage!r} stage first (graft stage {stage})" if stage else ""
        raise GraftError(f"{path}: input not found{hint}")
