"""domain: how far the target domain is from the source, per layer of the frozen backbone.

Active when `data.domain_column` and `domain.target` are set (rows whose domain is the target
value are the target, every other row the source); otherwise it writes a stub saying why. A
balanced, seeded sample of each domain's train rows is embedded once with every layer
(`embed_layers`). Per layer: the proxy A-distance 2(1 - 2 err) of a logistic-regression domain
classifier (err on a held-out half, with a bootstrap interval), and MMD² (RBF kernel, median
heuristic bandwidth, unbiased) with a permutation test. Then the linear probe on the cached
features trained on source rows only vs on target rows (as many of each) is scored on the
target's test rows. A separate stage from the curve: it needs a second domain and a backbone
pass, the curve needs neither.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from graft import config
from graft.errors import GraftError, exits_cleanly
from graft.files import atomic_write_bytes, write_json
from graft.layout import Layout, require
from graft.lengths import resolved_tokenization
from graft.stats import bootstrap_indices, interval, mcnemar_exact


def proxy_a_distance(source: np.ndarray, target: np.ndarray, *, samples: int, confidence: float, seed: int) -> dict:
    """2(1 - 2 err) of a domain classifier trained on half of each domain, err on the other half;
    the interval resamples the held-out rows. Near 0: indistinguishable; 2: fully separable."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = np.vstack([source, target])
    d = np.r_[np.zeros(len(source), int), np.ones(len(target), int)]
    fit_rows = np.zeros(len(d), bool)
    for value in (0, 1):
        rows = rng.permutation(np.flatnonzero(d == value))
        fit_rows[rows[: len(rows) // 2]] = True
    mean, scale = x[fit_rows].mean(0), x[fit_rows].std(0) + 1e-8
    z = (x - mean) / scale
    classifier = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(z[fit_rows], d[fit_rows])
    wrong = classifier.predict(z[~fit_rows]) != d[~fit_rows]
    errors = wrong[bootstrap_indices(len(wrong), samples, seed)].mean(1)
    err = float(wrong.mean())
    low, high = interval(2 * (1 - 2 * errors), confidence)
    return {"proxy_a_distance": 2 * (1 - 2 * err), "proxy_a_distance_ci": [low, high], "domain_error": err,
            "held_out": int(len(wrong))}


def _mmd2(kernel: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for index sets a (k, m) and b (k, n) of the same kernel matrix, k at once."""
    def within(rows: np.ndarray) -> np.ndarray:
        block = kernel[rows[:, :, None], rows[:, None, :]]
        m = rows.shape[1]
        return (block.sum((1, 2)) - np.trace(block, axis1=1, axis2=2)) / (m * (m - 1))
    across = kernel[a[:, :, None], b[:, None, :]].mean((1, 2))
    return within(a) + within(b) - 2 * across


def mmd_test(source: np.ndarray, target: np.ndarray, *, permutations: int, samples: int, confidence: float,
             seed: int) -> dict:
    """MMD² with an RBF kernel (bandwidth: the median pairwise distance), its permutation p-value
    ((1 + permutations at least as large) / (1 + permutations)) and a bootstrap interval."""
    x = np.vstack([source, target]).astype(np.float64)
    sq = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T, 0)
    bandwidth = float(np.sqrt(np.median(sq[np.triu_indices(len(x), 1)])))
    kernel = np.exp(-sq / (2 * bandwidth**2 + 1e-12))
    m, n = len(source), len(target)
    observed = float(_mmd2(kernel, np.arange(m)[None], np.arange(m, m + n)[None])[0])
    rng = np.random.default_rng(seed)
    null = []
    for chunk in np.array_split(np.arange(permutations), max(1, permutations // 50)):
        order = np.argsort(rng.random((len(chunk), m + n)), axis=1)
        null.append(_mmd2(kernel, order[:, :m], order[:, m:]))
    null = np.concatenate(null)
    boot = []
    for chunk in np.array_split(np.arange(samples), max(1, samples // 50)):
        a = rng.integers(0, m, size=(len(chunk), m))
        b = m + rng.integers(0, n, size=(len(chunk), n))
        boot.append(_mmd2(kernel, a, b))
    return {"mmd2": observed, "mmd2_ci": interval(np.concatenate(boot), confidence), "bandwidth": bandwidth,
            "mmd_p_value": float((1 + (null >= observed).sum()) / (1 + permutations)), "permutations": permutations}


def balanced_sample(frame: pd.DataFrame, target: str, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train row positions of the source and of the target domain, as many of each (seeded)."""
    rng = np.random.default_rng(seed)
    is_target = frame["domain"].to_numpy() == target
    source_rows, target_rows = np.flatnonzero(~is_target), np.flatnonzero(is_target)
    n = min(len(source_rows), len(target_rows), max_rows)
    return np.sort(rng.permutation(source_rows)[:n]), np.sort(rng.permutation(target_rows)[:n])


def domain(params: config.Params, *, layout: Layout) -> dict:
    """Write reports/domain.json and its plot (a stub saying why when the stage is off)."""
    from graft.report import domain_png, note_png

    column, target = params.data.domain_column, params.domain.target
    if not column or target is None:
        result = {"enabled": False, "reason": "needs data.domain_column and domain.target"}
        write_json(layout.domain_report, result)
        atomic_write_bytes(layout.domain_plot, note_png("domain gap: off (data.domain_column, domain.target)"))
        return result
    # torch, transformers and scikit-learn only past the off switch: a stage that is off costs its
    # interpreter start, not the 10 s of those imports
    from graft.modeling import embed_layers, load_encoder, load_tokenizer, select_device
    split = {s: layout.split_file(s) for s in ("train", "test")}
    require(*split.values(), layout.features_file("train"), layout.features_file("test"),
            layout.pretrained_dir / "config.json", root=layout.root)
    train, test = pd.read_parquet(split["train"]), pd.read_parquet(split["test"])
    found = sorted(set(train["domain"]))
    if target not in found or len(found) < 2:
        raise GraftError(f"domain.target: {target!r} and at least one other value must be in column {column!r} "
                         f"of the train split (found {found})")
    ev, seed = params.evaluate, params.seed
    source_rows, target_rows = balanced_sample(train, target, params.domain.max_rows, seed)
    if len(source_rows) < 4:
        raise GraftError(f"{split['train']}: {len(source_rows)} train rows per domain; the domain gap needs 4 or more")
    from sklearn.decomposition import PCA


    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    encoder = load_encoder(layout.pretrained_dir, trust_remote_code=trust)
    rows = np.r_[source_rows, target_rows]
    tokens = resolved_tokenization(params, layout)  # the length and truncation the features stage embedded with
    layers = embed_layers(encoder, tokenizer, train["text"].iloc[rows].tolist(), max_length=tokens.max_length,
                          truncation=tokens.truncation, batch_size=params.features.batch_size, device=select_device(),
                          desc="embed domains")
    n = len(source_rows)
    per_layer = []
    for i, hidden in enumerate(layers):
        per_layer.append({"layer": i, **proxy_a_distance(hidden[:n], hidden[n:], samples=ev.bootstrap_samples,
                                                         confidence=ev.confidence, seed=seed),
                          **mmd_test(hidden[:n], hidden[n:], permutations=params.domain.permutations,
                                     samples=min(ev.bootstrap_samples, 200), confidence=ev.confidence, seed=seed)})
    source_name = "+".join(v for v in found if v != target)
    result = {"enabled": True, "column": column, "source": source_name, "target": target, "rows_per_domain": n,
              "kernel": "RBF, bandwidth = median pairwise distance; MMD² unbiased",
              "layers": per_layer,
              "target_test": _source_only_vs_target(params, layout=layout, train=train, test=test,
                                                    source_rows=source_rows, target_rows=target_rows)}
    projection = PCA(n_components=2, random_state=seed).fit_transform(layers[-1])
    write_json(layout.domain_report, result)
    atomic_write_bytes(layout.domain_plot, domain_png(result, projection, np.r_[np.zeros(n, bool), np.ones(n, bool)]))
    return result


def _source_only_vs_target(params: config.Params, *, layout: Layout, train: pd.DataFrame, test: pd.DataFrame,
                           source_rows: np.ndarray, target_rows: np.ndarray) -> dict:
    """The linear probe on the cached features, trained on source rows or on as many target rows,
    scored on the target domain's test rows (bootstrap intervals, paired McNemar)."""
    from graft.training import train_linear_probe

    train_x, test_x = np.load(layout.features_file("train")), np.load(layout.features_file("test"))
    val, val_x = pd.read_parquet(layout.split_file("val")), np.load(layout.features_file("val"))
    y = train["label_id"].to_numpy()
    on_target = test["domain"].to_numpy() == params.domain.target
    if not on_target.any():
        raise GraftError(f"{layout.split_file('test')}: no test row of domain {params.domain.target!r}")
    x_t, y_t = test_x[on_target], test["label_id"].to_numpy()[on_target]
    ev = params.evaluate
    resamples = bootstrap_indices(len(y_t), ev.bootstrap_samples, params.seed)
    right = {}
    val_target = val["domain"].to_numpy() == params.domain.target
    for name, rows, val_rows in (("source_only", source_rows, ~val_target), ("target_trained", target_rows, val_target)):
        # C as train chooses it (fixed, or auto on validation), on validation rows of the training domain
        # only: source-only must not see a target label
        if not val_rows.any():
            raise GraftError(f"{layout.split_file('val')}: no validation row of the {name.replace('_', ' ')} domain")
        weight, bias, _ = train_linear_probe(train_x[rows], y[rows], val_x[val_rows], val["label_id"].to_numpy()[val_rows],
                                             C=params.train.probe.C, C_grid=params.train.probe.C_grid, seed=params.seed)
        right[name] = (x_t @ weight.T + bias).argmax(1) == y_t
    return {"test_rows": int(on_target.sum()), "train_rows": int(len(source_rows)),
            "candidates": {k: {"accuracy": float(v.mean()), "accuracy_ci": interval(v[resamples].mean(1), ev.confidence)}
                           for k, v in right.items()},
            "gap": float(right["target_trained"].mean() - right["source_only"].mean()),
            "test": mcnemar_exact(right["target_trained"], right["source_only"])}


@exits_cleanly
def main() -> None:
    result = domain(config.load(), layout=Layout())
    if not result["enabled"]:
        print(f"domain: off ({result['reason']})")  # noqa: T201
        return
    last = result["layers"][-1]
    acc = result["target_test"]["candidates"]
    print(  # noqa: T201
        f"domain: {result['source']} -> {result['target']}: last layer proxy A-distance {last['proxy_a_distance']:.3f}, "
        f"MMD² {last['mmd2']:.4f} (p={last['mmd_p_value']:.3g}); target test accuracy source-only "
        f"{acc['source_only']['accuracy']:.3f}, target-trained {acc['target_trained']['accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
