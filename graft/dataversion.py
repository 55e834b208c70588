"""`graft data`: the data version a model was trained on, and what changed since the last commit.

The committed side comes from DVC itself (`dvc.api.open` at git `HEAD`), so it is exactly the
row index that `git checkout HEAD && dvc checkout` would restore.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import yaml

from graft.dataset import diff_rows
from graft.files import read_json
from graft.layout import Layout, require


def _lock_hash(lock_text: str, path: str) -> str | None:
    """md5 that a dvc.lock records for one output path of the prepare stage."""
    lock = yaml.safe_load(lock_text) or {}
    for out in lock.get("stages", {}).get("prepare", {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


def committed_rows(layout: Layout, rev: str = "HEAD") -> tuple[pd.DataFrame | None, str]:
    """The row index recorded by `rev`'s dvc.lock, or None with the reason."""
    import dvc.api
    from dvc.exceptions import DvcException

    relative = layout.rows_index.relative_to(layout.root).as_posix()
    try:
        with dvc.api.open(relative, repo=str(layout.root), rev=rev, mode="rb") as handle:
            return pd.read_parquet(io.BytesIO(handle.read())), f"{rev}'s dvc.lock"
    except (DvcException, FileNotFoundError, OSError) as err:
        return None, f"no row index in {rev}'s dvc.lock ({type(err).__name__}); commit dvc.lock after a run to compare"


def data_version(layout: Layout, rev: str = "HEAD") -> dict:
    """Source, fingerprint, rows per class and split, raw snapshot hash, and the diff against `rev`."""
    require(layout.datacard, layout.rows_index, root=layout.root)
    card = read_json(layout.datacard)
    rows = pd.read_parquet(layout.rows_index)
    lock_path = Path(layout.root) / "dvc.lock"
    raw_md5 = _lock_hash(lock_path.read_text(), "data/raw") if lock_path.exists() else None
    old, against = committed_rows(layout, rev)
    return {
        "source": card["source"],
        "fingerprint": card["fingerprint"],
        "raw_snapshot_md5": raw_md5,
        "classes": card["classes"],
        "splits": {name: split["per_class"] for name, split in card["splits"].items()},
        "validation": card.get("validation", {}),
        "against": against,
        "changes": diff_rows(old, rows) if old is not None else None,
    }


def format_version(info: dict) -> str:
    classes = info["classes"]
    width = max(len(c) for c in classes) + 2
    lines = [f"source:       {info['source']}", f"fingerprint:  {info['fingerprint']}",
             f"raw snapshot: data/raw (md5 {info['raw_snapshot_md5'] or 'not in dvc.lock yet'})", "",
             "split  " + "".join(f"{c:>{width}}" for c in classes) + f"{'total':>8}"]
    for name, per_class in info["splits"].items():
        lines.append(f"{name:<7}" + "".join(f"{per_class[c]:>{width}}" for c in classes)
                     + f"{sum(per_class.values()):>8}")
    v = info["validation"]
    if v:
        lines.append(f"\nvalidation dropped {v.get('dropped_duplicates', 0)} duplicate(s) and "
                     f"{v.get('dropped_conflicts', 0)} conflicting row(s)")
    changes = info["changes"]
    if changes is None:
        lines.append(f"\nchanges: {info['against']}")
    else:
        lines.append(f"\nagainst {info['against']}: {changes['added']} added, {changes['removed']} removed, "
                     f"{changes['relabelled']} relabelled")
        if changes["relabelled_ids"]:
            lines.append("relabelled: " + ", ".join(changes["relabelled_ids"]))
    return "\n".join(lines)



