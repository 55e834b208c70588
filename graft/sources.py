"""Where data and models come from: installed packages, local paths, or the Hugging Face Hub."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd

from graft.errors import GraftError

PACKAGE_PREFIX = "package:"
HUB_DATASET_PREFIX = "hf:"
# owner/name or name, as the hub accepts them
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
TABLE_SUFFIXES = {".csv", ".parquet", ".jsonl", ".json"}


def package_path(ref: str) -> Path:
    """`package:NAME/sub/dir` -> the folder inside the installed package NAME (never imported)."""
    spec_text = ref[len(PACKAGE_PREFIX) :]
    name, _, sub = spec_text.partition("/")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GraftError(f"{ref}: no installed Python package named {name!r} (pip install it?)")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise GraftError(f"{ref}: package {name!r} is installed but has no {sub!r} inside it")
    return path


def read_table(source: str, revision: str | None = None) -> pd.DataFrame:
    """Read a data source into a frame; a folder of <class>/<doc>.txt gives columns id, text, label."""
    if source.startswith(HUB_DATASET_PREFIX):
        return _read_hub_dataset(source[len(HUB_DATASET_PREFIX) :], revision)
    path = package_path(source) if source.startswith(PACKAGE_PREFIX) else Path(source)
    if not path.exists():
        raise GraftError(f"{path}: data file not found (set data.source in params.yaml)")
    if path.is_dir():
        return _read_class_folders(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in {".jsonl", ".json"}:
            return pd.read_json(path, lines=suffix == ".jsonl")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise GraftError(f"{path}: cannot be read as {suffix[1:]}: {err}") from None
    raise GraftError(f"{path}: unsupported data file type {suffix!r}; use one of {sorted(TABLE_SUFFIXES)} or a folder")


def _read_class_folders(root: Path) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for doc in sorted(class_dir.glob("*.txt")):
            raw = doc.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows.append({"id": f"{class_dir.name}/{doc.name}", "text": text, "label": class_dir.name})
    if not rows:
        raise GraftError(f"{root}: no <class>/<document>.txt files found in this folder")
    return pd.DataFrame(rows)


def _read_hub_dataset(name: str, revision: str | None) -> pd.DataFrame:
    import datasets

    dataset_name, _, split = name.partition(":")
    try:
        loaded = datasets.load_dataset(dataset_name, split=split or "train", revision=revision)
    except Exception as err:  # the hub raises many types; the user needs the message
        raise GraftError(f"hf:{name}: cannot load the data set from the Hugging Face Hub: {err}") from None
    return loaded.to_pandas()
