"""The data-efficiency curve (tasks/curve.py) and the domain gap (tasks/domain.py) on the tiny
workspace, and their statistics on planted cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from graft.config import validate
from graft.files import read_json
from graft.layout import Layout
from tasks.curve import (
    ALL,
    catch_up_size,
    curve,
    labels_needed,
    labels_needed_interval,
    nested_subsets,
)
from tasks.domain import domain, mmd_test, proxy_a_distance
from tasks.evaluate import optional_sections

from .conftest import (
    NEWS_CSV,
    load_params,
    make_workspace,
    run_features,
    run_fetch,
    run_prepare,
    run_select,
    tiny_params,
)


@pytest.fixture(scope="module")
def featured(tmp_path_factory, tiny_model_dir):
    """A tiny workspace through features, whose data has a `site` column: two halves of one domain."""
    frame = pd.read_csv(NEWS_CSV)
    frame["site"] = ["a", "b"] * (len(frame) // 2)
    source = tmp_path_factory.mktemp("curve-data") / "news_sites.csv"
    frame.to_csv(source, index=False)
    params = tiny_params(tiny_model_dir, data_source=source)
    params["data"]["domain_column"] = "site"
    root = make_workspace(tmp_path_factory.mktemp("curve") / "ws", params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_prepare(root)
        run_fetch(root)
        run_select(root)
        run_features(root)
    return root


def with_changes(root, **sections):
    raw = load_params(root).model_dump()
    for name, values in sections.items():
        raw[name].update(values)
    return validate(raw)


def test_subsets_are_stratified_nested_and_differ_by_seed():
    labels = np.repeat([0, 1, 2], [30, 20, 25])
    subsets = nested_subsets(labels, [2, 4, 8, 16], seed=3)
    for small, large in zip([2, 4, 8], [4, 8, 16], strict=True):
        assert set(subsets[small]) <= set(subsets[large])
    for k, rows in subsets.items():
        assert np.bincount(labels[rows]).tolist() == [k, k, k]
    assert set(nested_subsets(labels, [4], seed=4)[4]) != set(subsets[4])


def test_catch_up_is_the_size_from_which_the_intervals_overlap_for_good():
    sizes = [8, 16, 32, 64, ALL]
    transfer = [[0.70, 0.80], [0.75, 0.85], [0.80, 0.90], [0.85, 0.92], [0.90, 0.95]]
    # below at 8 and 16, overlapping from 32 on
    assert catch_up_size(sizes, transfer, [[0.3, 0.4], [0.5, 0.6], [0.78, 0.82], [0.84, 0.88], [0.91, 0.96]]) == 32
    # overlaps at 16, falls behind at 32, overlaps again from 64 on
    assert catch_up_size(sizes, transfer, [[0.3, 0.4], [0.7, 0.8], [0.6, 0.7], [0.86, 0.9], [0.94, 0.97]]) == 64
    # above transfer everywhere: caught up from the smallest size
    assert catch_up_size(sizes, transfer, [[0.9, 0.99]] * 5) == 8
    # still behind at the largest size: never
    assert catch_up_size(sizes, transfer, [[0.3, 0.4], [0.8, 0.9], [0.85, 0.9], [0.86, 0.9], [0.5, 0.6]]) is None


def test_labels_needed_interpolates_on_log_size():
    assert labels_needed([8, 16, 32], [0.5, 0.7, 0.9], 0.8) == pytest.approx(math.sqrt(16 * 32))
    assert labels_needed([8, 16, 32], [0.5, 0.7, 0.9], 0.75) == pytest.approx(16 * 2 ** 0.25)
    assert labels_needed([8, 16, 32], [0.85, 0.9, 0.95], 0.8) == 8
    assert labels_needed([8, 16, 32], [0.5, 0.6, 0.7], 0.8) is None
    replicates = np.array([[0.5, 0.5, 0.5], [0.7, 0.9, 0.6], [0.9, 0.95, 0.7]])  # points x replicates
    found = labels_needed_interval([8, 16, 32], replicates, 0.8, 0.95)
    assert found["unreached_share"] == pytest.approx(1 / 3)
    # the two that reach it: 8 * 2 ** 0.75 (between 8 and 16) and sqrt(16 * 32)
    assert 8 * 2 ** 0.75 <= found["ci"][0] < found["ci"][1] <= math.sqrt(16 * 32)


def test_linear_probe_and_tfidf_points_run_no_backbone_forward_pass(featured, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("a torch module was called")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_forward)
    monkeypatch.setattr("graft.modeling.load_encoder", no_forward)
    params = with_changes(featured, curve={"enabled": True, "sizes": [2, 4, 50], "seeds": 3, "seeds_below": 4,
                                           "finetune_sizes": []})
    result = curve(params, layout=Layout(featured))
    assert read_json(Layout(featured).curve_report) == result
    assert Layout(featured).curve_plot.read_bytes()[:4] == b"\x89PNG"
    assert result["sizes"] == [2, 4, ALL] and result["skipped_sizes"] == [50]
    assert set(result["curves"]) == {"linear_probe", "tfidf"}
    for points in result["curves"].values():
        assert [p["seeds"] for p in points] == [3, 1, 1]
        assert [p["labels"] for p in points] == [6, 12, 18]
        for p in points:
            low, high = p["accuracy_ci"]
            assert low <= p["accuracy"] <= high
    assert result["target_accuracy"] == pytest.approx(0.9 * result["full_data_accuracy"])
    assert set(result["labels_needed"]) == {"linear_probe", "tfidf"}
    assert all(isinstance(n["at_most"], bool) for n in result["labels_needed"].values())
    sections = optional_sections(Layout(featured))  # what evaluate adds to report.html
    assert sections["curve"][0] == "Data-efficiency curve" and "data:image/png;base64," in sections["curve"][1]


def test_the_curve_is_a_stub_when_off(featured):
    result = curve(load_params(featured), layout=Layout(featured))
    assert result["enabled"] is False and "curve.enabled" in result["reason"]
    assert Layout(featured).curve_plot.exists()
    assert "curve" not in optional_sections(Layout(featured))


def test_planted_domains_same_domain_halves_versus_separated():
    rng = np.random.default_rng(0)
    one_domain = rng.normal(size=(240, 16))
    halves = {"samples": 200, "confidence": 0.95, "seed": 0}
    pad = proxy_a_distance(one_domain[:120], one_domain[120:], **halves)
    mmd = mmd_test(one_domain[:120], one_domain[120:], permutations=199, **halves)
    assert abs(pad["proxy_a_distance"]) < 0.35 and pad["proxy_a_distance_ci"][0] < 0 < pad["proxy_a_distance_ci"][1]
    assert mmd["mmd_p_value"] > 0.05
    shifted = rng.normal(size=(120, 16)) + 1.0
    pad = proxy_a_distance(one_domain[:120], shifted, **halves)
    mmd = mmd_test(one_domain[:120], shifted, permutations=199, **halves)
    assert pad["proxy_a_distance"] > 1.5 and pad["proxy_a_distance_ci"][0] > 1.0
    assert mmd["mmd_p_value"] <= 0.01 and mmd["mmd2_ci"][0] > 0


def test_domain_stage_per_layer_and_source_only_vs_target_trained(featured):
    layout = Layout(featured)
    params = with_changes(featured, domain={"target": "b", "max_rows": 500, "permutations": 19})
    result = domain(params, layout=layout)
    assert read_json(layout.domain_report) == result
    assert (result["source"], result["target"]) == ("a", "b")
    assert len(result["layers"]) == 3  # embeddings + the tiny model's 2 blocks
    for layer in result["layers"]:
        assert layer["proxy_a_distance_ci"][0] <= layer["proxy_a_distance"] <= layer["proxy_a_distance_ci"][1]
        assert 0 < layer["mmd_p_value"] <= 1
    test = result["target_test"]
    assert set(test["candidates"]) == {"source_only", "target_trained"}
    assert test["test_rows"] == int((pd.read_parquet(layout.split_file("test"))["domain"] == "b").sum())
    assert layout.domain_plot.read_bytes()[:4] == b"\x89PNG"
    stub = domain(load_params(featured), layout=layout)
    assert stub["enabled"] is False
