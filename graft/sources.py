"""Where data and models come from: installed packages, local paths, or the Hugging Face Hub."""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
from pathlib import Path

import pandas as pd
import yaml

from graft.errors import GraftError, TransientError
from graft.files import atomic_path, atomic_write_text

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


def read_table(source: str, revision: str | None = None, *, encoding_fallback: str | None = None) -> pd.DataFrame:
    """Read a data source into a frame; a folder of <class>/<doc>.txt gives columns id, text, label."""
    frame, _ = read_table_with_notes(source, revision, encoding_fallback=encoding_fallback)
    return frame


def read_table_with_notes(
    source: str | Path, revision: str | None = None, *, encoding_fallback: str | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """`read_table`, plus what decoding had to do (lines decoded with the fallback codec)."""
    source = str(source)
    if source.startswith(HUB_DATASET_PREFIX):
        return _read_hub_dataset(source[len(HUB_DATASET_PREFIX) :], revision), []
    path = package_path(source) if source.startswith(PACKAGE_PREFIX) else Path(source)
    if not path.exists():
        raise GraftError(f"{path}: data file not found (set data.source in params.yaml)")
    if path.is_dir():
        return _read_class_folders(path, encoding_fallback)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise GraftError(f"{path}: unsupported data file type {suffix!r}; use one of {sorted(TABLE_SUFFIXES)} or a folder")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path), []
        text, notes = decode(path.read_bytes(), path, encoding_fallback)
        if suffix == ".csv":
            return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""]), notes
        return pd.read_json(io.StringIO(text), lines=suffix == ".jsonl"), notes
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise GraftError(f"{path}: cannot be read as {suffix[1:]}: {err}") from None


def decode(raw: bytes, path: Path, encoding_fallback: str | None) -> tuple[str, list[str]]:
    """UTF-8 text of a file; a line that is not UTF-8 is refused, naming the line, or decoded
    with `encoding_fallback` and counted."""
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        if encoding_fallback is None:
            raise GraftError(
                f"{path}: line {line}: invalid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                "set data.encoding_fallback (e.g. cp1252) to decode such lines with that codec"
            ) from None
    lines, fallback_lines = [], []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(chunk.decode(encoding_fallback, errors="replace"))
            fallback_lines.append(number)
    shown = ", ".join(map(str, fallback_lines[:10]))
    return "\n".join(lines), [f"{path.name}: {len(fallback_lines)} line(s) decoded as {encoding_fallback} (lines {shown})"]


def _read_class_folders(root: Path, encoding_fallback: str | None) -> tuple[pd.DataFrame, list[str]]:
    rows, notes = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for doc in sorted(class_dir.glob("*.txt")):
            text, doc_notes = decode(doc.read_bytes(), doc, encoding_fallback)
            notes += doc_notes
            rows.append({"id": f"{class_dir.name}/{doc.name}", "text": text, "label": class_dir.name})
    if not rows:
        raise GraftError(f"{root}: no <class>/<document>.txt files found in this folder")
    return pd.DataFrame(rows), notes


def resolve_local(source: str) -> Path:
    """The local file or folder behind a package or path source (hub sources have none)."""
    path = package_path(source) if source.startswith(PACKAGE_PREFIX) else Path(source).expanduser()
    if not path.exists():
        raise GraftError(f"{source}: data file not found (set data.source in params.yaml)")
    return path


def hub_dataset_commit(source: str, revision: str | None) -> str:
    """The commit a hub data set's revision points at now (moving `main` changes it)."""
    from huggingface_hub import HfApi

    name = source[len(HUB_DATASET_PREFIX) :].partition(":")[0]
    try:
        return str(HfApi().dataset_info(name, revision=revision).sha)
    except Exception as err:  # the hub's HTTP stack raises many types; the user needs the message
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        kind = GraftError if isinstance(err, RepositoryNotFoundError | RevisionNotFoundError) else TransientError
        raise kind(
            f"data.source={source!r}: cannot resolve the revision on the Hugging Face Hub "
            f"({type(err).__name__}: {err}); use a local file or an installed package offline"
        ) from None


def snapshot(source: str, revision: str | None, raw_dir: Path) -> Path:
    """Copy the bytes behind `source` into `raw_dir` (a DVC output, so they are cached and
    pushed) and return the copy's path, which `prepare` then reads."""
    with atomic_path(raw_dir) as tmp:
        tmp.mkdir()
        if source.startswith(HUB_DATASET_PREFIX):
            name = source[len(HUB_DATASET_PREFIX) :].replace("/", "__").replace(":", "__")
            _read_hub_dataset(source[len(HUB_DATASET_PREFIX) :], revision).to_parquet(tmp / f"{name}.parquet", index=False)
        else:
            src = resolve_local(source)
            if src.is_dir():
                shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
            else:
                shutil.copyfile(src, tmp / src.name)
    return raw_dir / next(iter(sorted(p.name for p in raw_dir.iterdir())))


def describe_source(path: Path, root: Path) -> str:
    """A path as dvc.yaml should name it: relative inside the repository, absolute outside."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(resolved)


def write_source_file(path: Path, payload: dict, comment: str) -> bool:
    """Write a resolved-source file if its content changed; True when it did."""
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + yaml.safe_dump(payload, sort_keys=False)
    if path.exists() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


def read_source_file(path: Path) -> dict:
    if not path.exists():
        raise GraftError(f"{path}: not found; run `graft sources` (graft run does it before the stages)")
    return yaml.safe_load(path.read_text()) or {}


def _read_hub_dataset(name: str, revision: str | None) -> pd.DataFrame:
    import datasets

    dataset_name, _, split = name.partition(":")
    try:
        loaded = datasets.load_dataset(dataset_name, split=split or "train", revision=revision)
    except Exception as err:  # the hub raises many types; the user needs the message
        raise GraftError(f"hf:{name}: cannot load the data set from the Hugging Face Hub: {err}") from None
    return loaded.to_pandas()

