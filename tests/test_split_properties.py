"""Property-based tests of the splitter: no text in two splits, per-class counts within one of
the stratified target, and the same split for the same content in any row order."""

from __future__ import annotations

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.dataset import content_id, split_frame, validate_frame


@st.composite
def datasets(draw):
    classes = draw(st.integers(min_value=2, max_value=5))
    counts = [draw(st.integers(min_value=6, max_value=40)) for _ in range(classes)]
    rows = [{"text": f"text {c} {i} " + "w" * draw(st.integers(0, 3)), "label": f"c{c}"}
            for c, n in enumerate(counts) for i in range(n)]
    total = sum(counts)
    train = draw(st.integers(min_value=classes, max_value=max(classes, total // 3)))
    val = draw(st.integers(min_value=classes, max_value=max(classes, (total - train) // 3)))
    test = draw(st.one_of(st.none(), st.integers(min_value=classes, max_value=total - train - val)))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    permutation = draw(st.permutations(range(total)))
    return pd.DataFrame(rows), train, val, test, seed, list(permutation)


def _split(frame: pd.DataFrame, train: int, val: int, test: int | None, seed: int) -> dict[str, pd.DataFrame]:
    clean = validate_frame(frame, source="mem", text_column="text", label_column="label", id_column="none").frame
    return split_frame(clean, train_size=train, val_size=val, test_size=test, seed=seed, source="mem")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_splits_are_disjoint_stratified_and_order_free(case):
    frame, train, val, test, seed, permutation = case
    splits = _split(frame, train, val, test, seed)

    texts = [set(part["text"]) for part in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert len(splits["train"]) == train and len(splits["val"]) == val
    if test is not None:
        assert len(splits["test"]) == test

    # each split is a stratified sample of what was left when it was drawn
    remaining = frame["label"].value_counts()
    for name in ("train", "val", "test"):
        size = len(splits[name])
        got = splits[name]["label"].value_counts().reindex(remaining.index, fill_value=0)
        target = remaining * size / remaining.sum()
        assert ((got - target).abs() <= 1).all(), (name, got.to_dict(), target.to_dict())
        remaining = remaining - got

    shuffled = _split(frame.iloc[permutation].reset_index(drop=True), train, val, test, seed)
    for name in splits:
        pd.testing.assert_frame_equal(splits[name], shuffled[name])
    assert splits["train"]["id"].map(lambda i: i.startswith("sha-")).all()
    assert set(splits["train"]["id"]) == {content_id(t) for t in splits["train"]["text"]}
