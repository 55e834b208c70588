"""Model references: an installed package's folder, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from graft.errors import GraftError, TransientError
from graft.sources import HUB_ID, PACKAGE_PREFIX, package_path


def resolve_model_path(ref: str) -> Path | None:
    """The local folder behind a package or path reference; None for a hub id."""
    if ref.startswith(PACKAGE_PREFIX):
        return package_path(ref)
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if ref.startswith((".", "/", "~")) or not HUB_ID.match(ref):
        raise GraftError(
            f"model.ref={ref!r}: unknown model reference: not an installed package "
            f"('{PACKAGE_PREFIX}NAME/dir'), not a local folder, not a hub id ('owner/name')"
        )
    return None


# Each set is a tokenizer transformers can load; with none of them, AutoTokenizer quietly builds
# one of special tokens only, and every word becomes [UNK].
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("*.model",))


def missing_tokenizer_files(names: Iterable[str]) -> str | None:
    """None when `names` hold a loadable tokenizer, else the files that would make one."""
    names = list(names)
    if any(all(any(fnmatch(n, p) for n in names) for p in group) for group in TOKENIZER_FILES):
        return None
    return ", ".join(" + ".join(group) for group in TOKENIZER_FILES)


def hub_error(repo_id: str, revision: str | None, err: Exception) -> GraftError:
    """What a failed hub call means for the user: a wrong name or revision is bad input (exit 2);
    no network, a rate limit or a server error is transient (exit 75, worth a retry)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, RepositoryNotFoundError):
        return GraftError(f"model.ref={repo_id!r}: unknown model reference: no such model on the Hugging Face Hub")
    if isinstance(err, RevisionNotFoundError):
        return GraftError(f"model.ref={repo_id!r}: no revision {revision!r} on the Hugging Face Hub")
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        kind = TransientError if status is None or status == 429 or status >= 500 else GraftError
        return kind(f"model.ref={repo_id!r}: cannot download from the Hugging Face Hub: {err}")
    return TransientError(
        f"model.ref={repo_id!r}: cannot reach the Hugging Face Hub ({type(err).__name__}: {err}); "
        "use a local folder or an installed package offline"
    )


def hub_model_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub model's revision points at now."""
    from huggingface_hub import HfApi

    try:
        return str(HfApi().model_info(repo_id, revision=revision).sha)
    except Exception as err:  # the hub's HTTP stack raises many types: classified in one place
        raise hub_error(repo_id, revision, err) from None
