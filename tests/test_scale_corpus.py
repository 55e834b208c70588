"""benchmarks/scale.py's corpus builder: k x the rows, every text distinct, labels kept, and a
corpus prepare accepts (no duplicate dropped, no text under two labels)."""

from __future__ import annotations

import importlib.util

import pandas as pd

from graft.dataset import validate_frame
from tests.conftest import NEWS_CSV, REPO


def load_scale():
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replicas_are_distinct_texts_with_their_labels():
    scale = load_scale()
    base = pd.read_csv(NEWS_CSV)[["text", "label"]]
    corpus = scale.build_corpus(base, 4)
    assert len(corpus) == 4 * len(base)
    assert corpus["text"].nunique() == len(corpus)
    assert corpus["text"].iloc[: len(base)].tolist() == base["text"].tolist()  # replica 0 is the original
    for replica in range(4):
        part = corpus.iloc[replica * len(base) : (replica + 1) * len(base)]
        assert part["label"].tolist() == base["label"].tolist()
        if replica:
            assert part["text"].str.endswith(f" replica{replica}").all()
    # the same words as the original, reordered by sentence
    first = base["text"].iloc[0]
    assert sorted(scale.replica_text(first, 3).split()[:-1]) == sorted(first.split())
    validated = validate_frame(corpus, source="scale", text_column="text", label_column="label")
    assert validated.dropped_duplicates == 0 and validated.conflicts == 0


def test_texts_that_differ_only_in_spacing_stay_distinct():
    # BBC holds three such pairs: joining rotated sentences with one space made them collide at 4x
    scale = load_scale()
    base = pd.DataFrame({"text": ["One. Two.\nThree.", "One.  Two. Three."], "label": ["a", "b"]})
    corpus = scale.build_corpus(base, 3)
    assert corpus["text"].nunique() == 6
    assert scale.replica_text("One. Two.\nThree.", 1) == "Two. Three.\nOne. replica1"
