"""Pins of the sources: what DVC hashes for `data.source` and `model.ref` (dvc.yaml `vars`)."""

from __future__ import annotations

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


def write_sources(params: config.Params, layout: Layout) -> list[str]:
    """Resolve data.source and model.ref to what DVC should hash; write the two source files.

    A file or folder (local, or inside an installed package) is hashed itself; a hub data set or
    model is pinned by the commit its revision points at now, written into the source file, which
    is then its own dependency. Returns the files whose content changed."""
    root = layout.root
    data, model = params.data, params.model
    if data.source.startswith(HUB_DATASET_PREFIX):
        data_entry = {"data_source": describe_source(layout.data_source_file, root),
                      "data_source_commit": hub_dataset_commit(data.source, data.revision)}
    else:
        data_entry = {"data_source": _where(data.source, resolve_local(data.source), root), "data_source_commit": None}
    model_path = resolve_model_path(model.ref)
    if model_path is None:
        model_entry = {"model_source": describe_source(layout.model_source_file, root),
                       "model_source_commit": hub_model_commit(model.ref, model.revision)}
    else:
        model_entry = {"model_source": _where(model.ref, model_path, root), "model_source_commit": None}
    changed = []
    if write_source_file(layout.data_source_file,
                         {**data_entry, "data_source_ref": data.source, "data_source_revision": data.revision},
                         _SOURCE_COMMENT.format(stage="prepare", what="data set")):
        changed.append(str(layout.data_source_file))
    if write_source_file(layout.model_source_file,
                         {**model_entry, "model_source_ref": model.ref, "model_source_revision": model.revision},
                         _SOURCE_COMMENT.format(stage="fetch", what="backbone")):
        changed.append(str(layout.model_source_file))
    return changed


def _where(ref: str, path, root) -> str:
    """An installed package's folder by absolute path (an experiment's temporary copy of the
    repository has no .venv); a user's path relative to the repository when inside it."""
    if ref.startswith(PACKAGE_PREFIX):
        return str(path.resolve())
    return describe_source(path, root)
