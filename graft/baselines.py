"""Loading the TF-IDF baseline without importing the train stage (moved from tasks/train.py as-is;
the TF-IDF persistence is owned by issue 7 and may change behind this one function)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

TRAINING_STATE = "training.json"


def load_tfidf(model_dir: Path) -> Callable[[Sequence[str]], np.ndarray]:
    """Rebuild the TF-IDF baseline from its files; returns texts -> class probabilities."""
    state = json.loads((model_dir / TRAINING_STATE).read_text())
    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    with np.load(model_dir / "weights.npz", allow_pickle=False) as weights:
        idf, coef, intercept = weights["idf"], weights["coef"], weights["intercept"]
    vectorizer = TfidfVectorizer(ngram_range=(1, state["ngram_max"]), sublinear_tf=True, vocabulary=vocabulary)
    vectorizer.idf_ = idf

    def predict(texts: Sequence[str]) -> np.ndarray:
        scores = vectorizer.transform(texts) @ coef.T + intercept
        if coef.shape[0] == 1:  # binary logistic regression stores one row
            scores = np.hstack([-scores, scores])
        scores = scores - scores.max(axis=1, keepdims=True)
        proba = np.exp(scores)
        return proba / proba.sum(axis=1, keepdims=True)

    return predict
