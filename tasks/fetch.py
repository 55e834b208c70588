"""fetch: resolve every candidate backbone (model.ref, model.candidates) and copy its weights +
tokenizer into models/candidates/<n>-<name>/; the select stage picks THE backbone among them."""

from __future__ import annotations

import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_path, sha256_file, write_json
from graft.layout import Layout
from graft.modeling_refs import hub_error, missing_tokenizer_files, resolve_model_path
from graft.sources import PACKAGE_PREFIX, read_source_file

# What a backbone needs, and nothing that could execute on load.
KEEP_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "README.md"]
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def keep_patterns(trust_remote_code: bool) -> list[str]:
    """Files copied from a model folder; Python files only when remote code is trusted."""
    return [*KEEP_PATTERNS, "*.py"] if trust_remote_code else KEEP_PATTERNS


def resolve(ref: str, revision: str | None, *, commit: str | None = None,
            trust_remote_code: bool = False) -> tuple[Path, dict]:
    """Return a local folder for the reference and a description of where it came from
    (no machine-specific paths: the manifest is part of a DVC output compared across machines)."""
    path = resolve_model_path(ref)
    if path is not None:
        return path, {"kind": "package" if ref.startswith(PACKAGE_PREFIX) else "local", "ref": ref}
    return _download(ref, revision, commit=commit, trust_remote_code=trust_remote_code)


def _download(repo_id: str, revision: str | None, *, commit: str | None = None,
              trust_remote_code: bool) -> tuple[Path, dict]:
    from huggingface_hub import HfApi, snapshot_download

    try:
        # the commit pinned in models/source.yaml, so fetch downloads exactly what DVC recorded
        commit = commit or HfApi().model_info(repo_id, revision=revision).sha
        path = snapshot_download(repo_id, revision=commit, allow_patterns=keep_patterns(trust_remote_code))
    except Exception as err:  # the hub's HTTP stack raises many types: classified in one place
        raise hub_error(repo_id, revision, err) from None
    return Path(path), {"kind": "hub", "ref": repo_id, "revision": revision, "commit": commit}


def copy_model(src: Path, dst: Path, *, trust_remote_code: bool) -> list[str]:
    """Copy the files a backbone needs; refuse pickled weights and (unless allowed) model code."""
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n in PICKLE_WEIGHTS]
        hint = f" (found only {pickled}: convert them to safetensors)" if pickled else ""
        raise GraftError(f"{src}: no *.safetensors weights; graft never unpickles model files{hint}")
    if "config.json" not in names:
        raise GraftError(f"{src}: config.json is missing; not a transformers model folder")
    wanted = missing_tokenizer_files(names)
    if wanted and not trust_remote_code:  # model code may bring a tokenizer of its own
        raise GraftError(f"{src}: no tokenizer files (one of: {wanted}); found only {names}")
    if any(n.endswith(".py") for n in names) and not trust_remote_code:
        raise GraftError(f"{src}: the model ships Python code; set model.trust_remote_code=true only if you trust it")
    patterns = keep_patterns(trust_remote_code)
    dst.mkdir(parents=True)
    kept = [n for n in names if n not in PICKLE_WEIGHTS and any(fnmatch(n, p) for p in patterns)]
    for name in kept:
        shutil.copy2(src / name, dst / name)
    return kept


def describe(model_dir: Path, *, trust_remote_code: bool, source: Path | None = None) -> dict:
    """Load the copy (config, tokenizer, weights) to prove it works; return its architecture."""
    from safetensors import SafetensorError

    from graft.modeling import load_encoder, load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        encoder = load_encoder(model_dir, trust_remote_code=trust_remote_code)
    except SafetensorError as err:
        raise GraftError(f"{source or model_dir}: corrupt or truncated safetensors weights: {err}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GraftError(f"{source or model_dir}: not a loadable transformers encoder: {err}") from None
    cfg = encoder.config
    vocab_size = getattr(cfg, "vocab_size", None)
    # a tokenizer made for other weights: ids past the embeddings crash, far fewer tokens mean [UNK]s
    if vocab_size and not vocab_size // 2 <= len(tokenizer) <= vocab_size:
        raise GraftError(f"{source or model_dir}: the tokenizer knows {len(tokenizer)} tokens but the model's "
                         f"embeddings have {vocab_size}; its tokenizer files do not belong to these weights")
    return {
        "model_type": cfg.model_type,
        "architectures": list(cfg.architectures or []),
        "num_parameters": int(sum(p.numel() for p in encoder.parameters())),
        "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "hidden_size": int(cfg.hidden_size),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0)),
    }


def check_source_file(params: config.ModelParams, source_file: Path) -> str | None:
    """The path DVC hashed must describe the model configured now; returns the pinned hub commit."""
    pinned = read_source_file(source_file)
    if pinned.get("model_source_ref") != params.ref or pinned.get("model_source_revision") != params.revision:
        raise GraftError(
            f"{source_file}: describes model.ref={pinned.get('model_source_ref')!r}, but params.yaml has "
            f"{params.ref!r}; run `graft sources` (graft run does it before the stages)"
        )
    return pinned.get("model_source_commit")


def candidate_refs(params: config.ModelParams) -> list[tuple[str, str | None]]:
    """model.ref (at model.revision) first, then model.candidates (their newest revision); a ref
    listed twice counts once."""
    refs = [(params.ref, params.revision)]
    refs += [(ref, None) for ref in params.candidates if ref != params.ref]
    return list(dict.fromkeys(refs))


def candidate_slug(index: int, ref: str) -> str:
    """A folder name per candidate: its position and the ref's last part (refs may be paths)."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.rstrip("/").split("/")[-1]).strip("-.") or "model"
    return f"{index}-{tail[:60]}"


def fetch_one(ref: str, revision: str | None, *, commit: str | None, trust_remote_code: bool, dst: Path) -> dict:
    """Resolve, copy, verify and describe one backbone into `dst` (which must not exist)."""
    src, origin = resolve(ref, revision, commit=commit, trust_remote_code=trust_remote_code)
    kept = copy_model(src, dst, trust_remote_code=trust_remote_code)
    manifest = {
        "source": origin,
        "files": {name: {"sha256": sha256_file(dst / name), "bytes": (dst / name).stat().st_size} for name in kept},
        "architecture": describe(dst, trust_remote_code=trust_remote_code, source=src),
    }
    write_json(dst / "manifest.json", manifest)
    return manifest


def fetch(params: config.Params, *, source_file: Path, out_dir: Path) -> dict:
    """Fetch every candidate backbone into its own folder of `out_dir`; return the index
    ({"candidates": [{"folder", "ref", "manifest"}]}, model.ref first). model.ref is fetched at
    the commit pinned in `source_file`."""
    m = params.model
    commit = check_source_file(m, source_file)
    entries = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for index, (ref, revision) in enumerate(candidate_refs(m)):
            folder = candidate_slug(index, ref)
            manifest = fetch_one(ref, revision, commit=commit if index == 0 else None,
                                 trust_remote_code=m.trust_remote_code, dst=tmp / folder)
            entries.append({"folder": folder, "ref": ref, "manifest": manifest})
        write_json(tmp / "index.json", {"candidates": [{"folder": e["folder"], "ref": e["ref"]} for e in entries]})
    return {"candidates": entries}


@exits_cleanly
def main() -> None:
    layout = Layout()
    index = fetch(config.load(), source_file=layout.model_source_file, out_dir=layout.candidates_dir)
    for entry in index["candidates"]:
        arch = entry["manifest"]["architecture"]
        print(  # noqa: T201
            f"fetch: {entry['ref']} -> {layout.candidates_dir / entry['folder']} "
            f"({arch['model_type']}, {arch['num_hidden_layers']} layers, {arch['num_parameters']:,} parameters)"
        )


if __name__ == "__main__":
    main()
