"""features: embeddings per split, length-sorted batches that do not change results, LogME."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from graft.files import read_json
from graft.layout import Layout
from graft.modeling import embed, embed_layers, length_sorted_batches, load_encoder, load_tokenizer
from graft.transferability import logme

from .conftest import run_features, run_fetch, run_prepare, run_select


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert [len(b) for b in batches] == [3, 3, 1]


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    informative = rng.normal(size=(120, 16)) + np.eye(3, 16)[labels] * 3
    noise = rng.normal(size=(120, 16))
    assert logme(informative, labels) > logme(noise, labels) + 0.1


def test_features_per_split_match_unbatched_embedding(workspace: Path, tiny_model_dir: Path):
    run_prepare(workspace)
    run_fetch(workspace)
    run_select(workspace)
    result = run_features(workspace)
    layout = Layout(workspace)
    assert result["rows"] == {"train": 18, "val": 12, "test": 18}
    assert result["dims"] == 32
    # the backbone's manifest (a dependency of train and register) carries the choice, no seconds
    selection = read_json(layout.manifest)["selection"]
    assert "seconds" not in str(selection)
    train = np.load(layout.features_file("train"))
    assert train.shape == (18, 32) and np.isfinite(train).all()

    import pandas as pd
    import torch

    texts = pd.read_parquet("data/prepared/train.parquet")["text"].tolist()
    tok, enc = load_tokenizer(tiny_model_dir), load_encoder(tiny_model_dir)
    one_by_one = embed(enc, tok, texts, max_length=32, batch_size=1, device=torch.device("cpu"))
    np.testing.assert_allclose(train, one_by_one, atol=1e-5)


def test_every_layers_embeddings_end_with_the_final_embedding(tiny_model_dir: Path):
    encoder, tokenizer = load_encoder(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = ["bread recipe kitchen", "cloud robot data internet computer", "goal"]
    cpu = torch.device("cpu")
    layers = embed_layers(encoder, tokenizer, texts, max_length=16, batch_size=2, device=cpu)
    final = embed(encoder, tokenizer, texts, max_length=16, batch_size=2, device=cpu)
    assert layers.shape == (encoder.config.num_hidden_layers + 1, 3, encoder.config.hidden_size)
    np.testing.assert_allclose(layers[-1], final, atol=1e-6)
    # index 0 is the embedding layer: no block has run on it yet
    assert not np.allclose(layers[0], layers[1])


def test_scorers_tokenize_each_text_once_and_share_it_across_models_of_one_tokenizer(tiny_model_dir: Path,
                                                                                        monkeypatch):
    """A fast tokenizer encodes a whole text before it truncates (BBC articles run to thousands of
    tokens): evaluate's scorers score the test set, then its swaps, perturbations and visibility
    checks over the same texts. Each text is tokenized once per scorer, and once for all scorers
    whose tokenizers are the same definition; the rows are what unshared scorers give."""
    import pandas as pd

    from graft import modeling
    from graft.modeling import embedding_scorer

    seen: list[str] = []
    original = modeling.tokenize

    def counting(tokenizer, texts, *args, **kwargs):
        seen.extend(texts)
        return original(tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(modeling, "tokenize", counting)
    texts = pd.read_csv(Path(__file__).parent / "fixtures" / "news_tiny.csv")["text"].tolist()[:10]
    encoder = load_encoder(tiny_model_dir)
    kwargs = dict(max_length=16, batch_size=4, device=torch.device("cpu"))
    alone = embedding_scorer(encoder, load_tokenizer(tiny_model_dir), **kwargs)
    first = alone(texts)
    alone(texts[::-1])
    alone.changed(texts, [t.upper() for t in texts])
    assert sorted(seen) == sorted(texts + [t.upper() for t in texts])  # each distinct text once
    from graft.modeling import token_ids_cache

    caches: dict = {}
    shared = [embedding_scorer(encoder, tok, token_ids=token_ids_cache(caches, tok, max_length=16, truncation="head"),
                               **kwargs) for tok in (load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir))]
    seen.clear()
    rows = [s(texts) for s in shared]
    assert sorted(seen) == sorted(texts) and len(caches) == 1
    np.testing.assert_array_equal(rows[0], first)
    np.testing.assert_array_equal(rows[1], first)
    token_ids_cache(caches, load_tokenizer(tiny_model_dir), max_length=32, truncation="head")
    assert len(caches) == 2  # another length is another cache
