"""Pins of the sources: what DVC hashes for `data.source` and `model.ref` (dvc.yaml `vars`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from graft import config
from graft.layout import Layout
from graft.modeling_refs import hub_model_commit, resolve_model_path
from graft.sources import (
    HUB_DATASET_PREFIX,
    PACKAGE_PREFIX,
    describe_source,
    hub_dataset_commit,
    resolve_local,
    write_source_file,
)

_SOURCE_COMMENT = (
    "Written by `graft sources` (and by `graft run`) from params.yaml: the path DVC hashes for the\n"
    "{stage} stage (dvc.yaml `vars`), so a changed {what} makes {stage} stale. Commit it with dvc.lock."
)


def resolve_sources(params: config.Params, layout: Layout) -> dict[Path, tuple[dict, str]]:
    """What the two source files should hold for `params`: {file: (payload, comment)}.

    A file or folder (local, or inside an installed package) is hashed itself; a hub data set or
    model is pinned by the commit its revision points at now, written into the source file, which
    is then its own dependency."""
    root = layout.root
    data, model = params.data, params.model
    if data.source.startswith(HUB_DATASET_PREFIX):
        data_entry = {"data_source": describe_source(layout.data_source_file, root),
                      "data_source_commit": hub_dataset_commit(data.source, data.revision)}
    else:
        data_entry = {"data_source": _where(data.source, resolve_local(data.source), root), "data_source_commit": None}
    data_entry.update(_unlabelled_entry(data, layout))
    model_path = resolve_model_path(model.ref)
    if model_path is None:
        model_entry = {"model_source": describe_source(layout.model_source_file, root),
                       "model_source_commit": hub_model_commit(model.ref, model.revision)}
    else:
        model_entry = {"model_source": _where(model.ref, model_path, root), "model_source_commit": None}
    return {
        layout.data_source_file: ({**data_entry, "data_source_ref": data.source, "data_source_revision": data.revision,
                                   "unlabelled_source_ref": data.unlabelled_source,
                                   "unlabelled_source_revision": data.unlabelled_revision},
                                  _SOURCE_COMMENT.format(stage="prepare", what="data set")),
        layout.model_source_file: ({**model_entry, "model_source_ref": model.ref,
                                    "model_source_revision": model.revision},
                                   _SOURCE_COMMENT.format(stage="fetch", what="backbone")),
    }


def _unlabelled_entry(data: config.DataParams, layout: Layout) -> dict:
    """What DVC hashes for data.unlabelled_source (`${unlabelled_source}` in prepare's deps): the
    file or folder itself, a hub data set's commit (in this file), or, with none, this file."""
    own = describe_source(layout.data_source_file, layout.root)
    source = data.unlabelled_source
    if source is None:
        return {"unlabelled_source": own, "unlabelled_source_commit": None}
    if source.startswith(HUB_DATASET_PREFIX):
        return {"unlabelled_source": own, "unlabelled_source_commit": hub_dataset_commit(source, data.unlabelled_revision)}
    return {"unlabelled_source": _where(source, resolve_local(source), layout.root), "unlabelled_source_commit": None}


def write_sources(params: config.Params, layout: Layout) -> list[str]:
    """Resolve data.source and model.ref to what DVC should hash; write the two source files.
    Returns the files whose content changed."""
    return [str(path) for path, (payload, comment) in resolve_sources(params, layout).items()
            if write_source_file(path, payload, comment)]


def experiment_pins(params: config.Params, layout: Layout) -> list[str]:
    """The source files an experiment with these (overridden) params needs, as `dvc exp run -S`
    overrides (`data/source.yaml:data_source="..."`): DVC writes them into the experiment's copy
    only, as it does params.yaml's, so dvc.yaml `vars` there name the run's own source and the
    workspace's files stay as they are. A file that already says this is left out (rewriting
    it would make its stage stale for nothing)."""
    out: list[str] = []
    for path, (payload, _comment) in resolve_sources(params, layout).items():
        if path.exists() and (yaml.safe_load(path.read_text()) or {}) == payload:
            continue
        relative = Path(path).relative_to(layout.root).as_posix()
        out += [f"{relative}:{key}={json.dumps(value)}" for key, value in payload.items()]
    return out


def local_sources_inside(params: config.Params, root: Path) -> list[str]:
    """The local data source and backbone that live inside the repository, relative to it: an
    experiment's copy holds only git-tracked files, so these are copied in (`--copy-paths`)."""
    paths = []
    if not params.data.source.startswith((HUB_DATASET_PREFIX, PACKAGE_PREFIX)):
        paths.append(resolve_local(params.data.source))
    unlabelled = params.data.unlabelled_source
    if unlabelled is not None and not unlabelled.startswith((HUB_DATASET_PREFIX, PACKAGE_PREFIX)):
        paths.append(resolve_local(unlabelled))
    model_path = None if params.model.ref.startswith(PACKAGE_PREFIX) else resolve_model_path(params.model.ref)
    if model_path is not None:
        paths.append(model_path)
    inside = []
    for path in paths:
        with contextlib.suppress(ValueError):
            inside.append(path.resolve().relative_to(Path(root).resolve()).as_posix())
    return inside


def _where(ref: str, path, root) -> str:
    """An installed package's folder by absolute path (an experiment's temporary copy of the
    repository has no .venv); a user's path relative to the repository when inside it."""
    if ref.startswith(PACKAGE_PREFIX):
        return str(path.resolve())
    return describe_source(path, root)
