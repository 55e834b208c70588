"""Config is tested like code: params.yaml parses, dvc.yaml's params exist, errors name keys."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field, create_model

from graft import config
from graft.errors import GraftError

from .conftest import REPO


def _keys(mapping: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        out.add(dotted)
        if isinstance(value, dict):
            out |= _keys(value, f"{dotted}.")
    return out


def test_repository_params_validate():
    params = config.load(REPO / "params.yaml")
    assert params.model.trust_remote_code is False
    assert params.register.alias == "challenger"


def test_every_dvc_param_exists_and_every_stage_has_its_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    known = _keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert hasattr(importlib.import_module(f"tasks.{name}"), "main")
        for key in stage.get("params", []):
            assert key in known, f"dvc.yaml stage {name} lists params key {key!r} missing from params.yaml"
        for dep in stage.get("deps", []):
            if dep.endswith(".py"):
                assert (REPO / dep).exists(), dep


def test_every_params_key_is_a_typed_field():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    dumped = config.validate(raw).model_dump()
    assert _keys(raw) == _keys(dumped)


def second_defaults(model: type[BaseModel], raw: dict, prefix: str = "") -> list[str]:
    """Every field of `model` that carries a default of its own: a second place for a value that
    params.yaml holds (and one that may disagree with it), named with both values."""
    found = []
    for key, info in model.model_fields.items():
        dotted, given = f"{prefix}{key}", raw.get(key, "(absent)")
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            found.append(f"{dotted}: {default!r} in graft/config.py and {given!r} in params.yaml"
                         + ("" if default == given else ": they disagree"))
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found += second_defaults(info.annotation, given if isinstance(given, dict) else {}, f"{dotted}.")
    return found


def test_every_default_is_written_once_in_params_yaml():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert second_defaults(config.Params, raw) == []


def test_the_defaults_check_fails_when_one_default_is_changed_in_one_place_only():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # a default in graft/config.py beside params.yaml's, as data.encoding_fallback once was (None vs latin-1)
    data = create_model("Data", __base__=config.DataParams,
                        encoding_fallback=(str | None, Field(None, description="a second default")))
    assert second_defaults(data, raw["data"], "data.") == [
        "data.encoding_fallback: None in graft/config.py and 'latin-1' in params.yaml: they disagree"]
    # ... and params.yaml changed alone: a key it no longer holds is reported, not filled in from elsewhere
    del raw["data"]["encoding_fallback"]
    with pytest.raises(GraftError, match=r"data\.encoding_fallback: required key is missing"):
        config.validate(raw, "params.yaml")


def test_all_problems_reported_at_once_with_their_keys():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["lr"] = -1
    raw["train"]["learning_rate"] = 3e-5
    del raw["data"]["source"]
    with pytest.raises(GraftError) as err:
        config.validate(raw, "params.yaml")
    message = str(err.value)
    assert "3 invalid parameter(s)" in message
    assert "train.lr" in message and "train.learning_rate: unknown key" in message
    assert "data.source: required key is missing" in message


def test_overrides_are_written_with_comments_kept(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    applied = config.apply_overrides(["train.lr=3e-5", "train.scratch.epochs=2"], path)
    assert applied == {"train.lr": 3e-5, "train.scratch.epochs": 2}
    params = config.load(path)
    assert params.train.lr == 3e-5 and params.train.scratch.epochs == 2
    assert "# Each strategy trained is a candidate; the proposed model is the best on validation." in path.read_text()
    before, after = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    assert len(before) == len(after)
    assert [(a, b) for a, b in zip(before, after, strict=True) if a != b] == [
        ("  lr: 0.0001", "  lr: 3e-05"), ("    epochs: 5", "    epochs: 2")]


@pytest.mark.parametrize(
    ("override", "expected"),
    [("train.nope=1", "unknown parameter key(s) in override: train.nope"),
     ("train.lr=-1", "train.lr"),
     ("train.lr", "expected KEY=VALUE")],
)
def test_bad_override_names_the_key_and_leaves_the_file_alone(tmp_path: Path, override: str, expected: str):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(GraftError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        config.apply_overrides([override], path)
    assert path.read_text() == before


def test_missing_params_file_is_named(tmp_path: Path):
    with pytest.raises(GraftError, match="params.yaml: parameters file not found"):
        config.load(tmp_path / "params.yaml")
