"""Transferability scores on frozen features: which backbone, and which layer, carries the labels.

Each score ranks candidates on one data set; a single value means nothing on its own (LogME's
authors say so). Higher is better for all three.

- LogME (You et al., ICML 2021): the mean per-class log marginal evidence of a Bayesian linear
  model on the features, alpha and beta maximised by MacKay's fixed point.
- H-score (Bao et al., 2019): tr(cov(f)^-1 cov(E[f | y])), how far apart the class means are
  relative to the spread of the features; with Ledoit-Wolf shrinkage of cov(f) (Ibrahim et al.,
  2022), without which it is classes - 1 whenever there are fewer rows than dimensions.
- k-NN accuracy: a cosine 5-nearest-neighbour classifier fitted on train, scored on validation.

`score_layers` scores every layer's mean-pooled features and their average; `rank_candidates`
and `freeze_depth` turn the scores into the choices the pipeline makes.
"""

from __future__ import annotations

import time

import numpy as np

RANK_SCORE = "logme"  # the score that ranks candidates and picks the freezing depth
RANK_LAYER = "average"  # ... on the layer-averaged features (Garbaciauskas et al., 2024)
KNN_NEIGHBOURS = 5


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> float:
    """LogME: mean over classes of the maximised log evidence per sample of a Bayesian linear
    regression of the class indicator on the features (float64)."""
    f = features.astype(np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    k = sigma.size
    evidences = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)
        x = u.T @ y
        x2 = x**2
        residual_outside = max(float(y @ y - x2.sum()), 0.0)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= tol:
                break
        t = alpha / beta  # m2 and res2 at the final alpha and beta
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * (np.log(alpha + beta * sigma).sum() + (d - k) * np.log(alpha))
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """Shrinkage H-score (Ibrahim et al., 2022): tr(cov_a(f)^-1 (1 - a) cov(E[f|y])), with cov_a the
    Ledoit-Wolf estimate (1 - a) cov(f) + a mu I and E[f|y] each row's class mean (float64).

    The plain H-score inverts cov(f) itself. With fewer rows than dimensions (250 labels and 384
    or 768 dimensions here) that matrix is singular, and its pseudo-inverse makes the score
    classes - 1 for any features: every layer and every backbone tie. Shrinkage keeps it finite
    and informative; with many rows per dimension `a` goes to 0 and it is the plain H-score."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    f = features.astype(np.float64)
    f = f - f.mean(axis=0)
    n, d = f.shape
    cov_f = f.T @ f / n
    shrinkage = float(ledoit_wolf_shrinkage(f, assume_centered=True))
    shrunk = (1 - shrinkage) * cov_f + shrinkage * np.trace(cov_f) / d * np.eye(d)
    class_means = np.zeros_like(f)
    for cls in np.unique(labels):
        rows = labels == cls
        class_means[rows] = f[rows].mean(axis=0)
    cov_g = class_means.T @ class_means / n
    return float(np.trace(np.linalg.solve(shrunk, (1 - shrinkage) * cov_g)))


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 k: int = KNN_NEIGHBOURS) -> float:
    """Validation accuracy of a cosine k-nearest-neighbour classifier fitted on train."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine").fit(train_x, train_y)
    return float((knn.predict(val_x) == val_y).mean())


def _timed(fn, *args) -> dict:
    started = time.perf_counter()
    value = fn(*args)
    return {"value": value, "seconds": round(time.perf_counter() - started, 4)}


def score_layers(train_layers: np.ndarray, train_y: np.ndarray, val_layers: np.ndarray, val_y: np.ndarray) -> dict:
    """Every score, with its seconds, for each layer (index 0: the embeddings' output, i: block
    i's output) and for the average of all layers. Layer arrays: (layers + 1, rows, hidden)."""
    views = {str(i): (train_layers[i], val_layers[i]) for i in range(len(train_layers))}
    views[RANK_LAYER] = (train_layers.mean(axis=0), val_layers.mean(axis=0))
    return {name: {"logme": _timed(logme, tr, train_y), "hscore": _timed(hscore, tr, train_y),
                   "knn_val_accuracy": _timed(knn_accuracy, tr, train_y, va, val_y)}
            for name, (tr, va) in views.items()}


def rank_candidates(scores: dict[str, dict]) -> list[str]:
    """Candidates best first by LogME on their layer-averaged features (ties: the order given)."""
    names = list(scores)
    return sorted(names, key=lambda n: (-scores[n][RANK_LAYER][RANK_SCORE]["value"], names.index(n)))


def freeze_depth(layer_scores: dict, *, score: str = RANK_SCORE) -> int:
    """`train.freeze_layers: auto`: freeze the embeddings and every block up to the layer whose
    own features score best (those blocks already carry the most label information; the blocks
    above it are retrained), at most layers - 1 so the top block trains. When the embeddings'
    output (layer 0) scores best, 0: nothing is frozen. Ties go to the lower layer."""
    layers = sorted(int(name) for name in layer_scores if name.isdigit())
    best = max(layers, key=lambda i: (layer_scores[str(i)][score]["value"], -i))
    return min(best, max(layers) - 1)
