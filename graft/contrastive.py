"""The `setfit` strategy's library side: contrastive fine-tuning of a sentence-transformer body
with the setfit library, and the fold that turns the trained body and its logistic-regression
head into graft's own classifier (graft.modeling.MeanPoolingClassifier), so that what is saved,
evaluated and served is a plain graft model folder and setfit is needed only to train.

setfit, sentence-transformers and datasets are imported inside the functions: the train stage
imports this module whatever it trains, and only the setfit strategy pays for them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.truncation import tokenize as truncate_tokenize


def load_setfit_model(model_dir: Path, *, max_length: int, truncation: str, trust_remote_code: bool = False) -> Any:
    """A SetFitModel over `sentence_body(model_dir)` with setfit's default head (replaced by the
    caller's). Its body reads `max_length` tokens of each text, cut as `truncation` says
    (graft.truncation, what the folded model and the served one read), in the contrastive phase
    as in `encode`."""
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    body = sentence_body(model_dir, max_length=max_length, trust_remote_code=trust_remote_code)
    if truncation != "head":  # head: sentence-transformers' own cut (longest_first at max_length) is graft's
        _cut_as_graft_does(body[0], max_length=max_length, truncation=truncation)
    return SetFitModel(model_body=body, model_head=LogisticRegression())


def sentence_body(model_dir: Path, *, max_length: int, trust_remote_code: bool = False) -> Any:
    """The backbone as a sentence-transformer: Transformer, mean pooling (graft's pooling, the
    probe's) and Normalize where the folder's modules.json lists one (all-MiniLM-L6-v2 does; a
    plain encoder folder has no modules.json). Built here, not loaded from the module subfolders
    (1_Pooling/...), which models/pretrained does not hold (fetch copies a folder's top-level
    files); a modules.json with another module (Dense, ...) or a pooling config that is not mean
    is refused, since graft's classifier could not reproduce it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    model_dir = Path(model_dir)
    listed = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in read_modules(model_dir)]
    if listed and (listed[:2] != ["Transformer", "Pooling"] or listed[2:] not in ([], ["Normalize"])):
        raise GraftError(f"{model_dir / 'modules.json'}: the sentence-transformers pipeline is {listed}; the setfit "
                         "strategy folds Transformer, Pooling (mean) and an optional Normalize only")
    pooling_config = model_dir / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        mode = json.loads(pooling_config.read_text())
        if not mode.get("pooling_mode_mean_tokens", mode.get("pooling_mode") == "mean"):
            raise GraftError(f"{pooling_config}: not mean pooling; graft's classifier mean-pools")
    transformer = Transformer(str(model_dir), max_seq_length=max_length,
                              model_kwargs={"trust_remote_code": trust_remote_code, "use_safetensors": True},
                              processor_kwargs={"trust_remote_code": trust_remote_code},
                              config_kwargs={"trust_remote_code": trust_remote_code})
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]
    if listed[2:] == ["Normalize"]:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules)


def read_modules(model_dir: Path) -> list[dict]:
    """The folder's sentence-transformers modules.json (empty for a plain encoder folder)."""
    path = Path(model_dir) / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text())
    except ValueError as err:
        raise GraftError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise GraftError(f"{path}: expected a list of modules")
    return modules


def _cut_as_graft_does(module: Any, *, max_length: int, truncation: str) -> None:
    """Replace the token ids the body's Transformer module makes of texts with graft's cut of
    them (tail, head_tail), padded per batch; everything else its preprocess returns is kept."""
    original, tokenizer = module.preprocess, module.tokenizer

    def preprocess(inputs, *args, **kwargs):
        features = original(inputs, *args, **kwargs)
        if inputs and all(isinstance(x, str) for x in inputs):
            ids = truncate_tokenize(tokenizer, list(inputs), max_length=max_length, truncation=truncation)
            padded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            features["input_ids"], features["attention_mask"] = padded["input_ids"], padded["attention_mask"]
            if "token_type_ids" in features:
                features["token_type_ids"] = torch.zeros_like(padded["input_ids"])
        return features

    module.preprocess = preprocess


def fit_body(model: Any, texts: Sequence[str], labels: Sequence[int], *, lr: float, epochs: int, batch_size: int,
             num_iterations: int, max_length: int, seed: int) -> dict:
    """setfit's contrastive phase on the train texts: 2 x num_iterations x len(texts) pairs per
    epoch (one positive, one negative per text and iteration), CosineSimilarityLoss, setfit's
    other defaults. Only the body is trained here; the head is fitted by the caller. Returns the
    settings used."""
    from datasets import Dataset
    from setfit import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, body_learning_rate=lr, num_epochs=epochs, batch_size=batch_size,
                                 num_iterations=num_iterations, max_length=max_length,
                                 seed=seed, report_to="none", save_strategy="no", logging_strategy="no",
                                 show_progress_bar=True)
        train = Dataset.from_dict({"text": list(texts), "label": [int(y) for y in labels]})
        trainer = Trainer(model=model, args=args, train_dataset=train)  # seeds every RNG with `seed`
        trainer.train_embeddings(list(texts), [int(y) for y in labels], args=args)
    return {"body_lr": lr, "epochs": epochs, "batch_size": batch_size, "num_iterations": num_iterations,
            "pairs_per_epoch": 2 * num_iterations * len(texts), "loss": args.loss.__name__,  # setfit's default
            "max_length": max_length, "seed": seed}


def body_parts(model: Any) -> tuple[torch.nn.Module, bool]:
    """(the body's transformers encoder, whether it L2-normalises): a body graft can fold is a
    Transformer module, mean pooling, and optionally Normalize; anything else is refused by name."""
    modules = list(model.model_body)
    names = [type(m).__name__ for m in modules]
    if len(modules) not in (2, 3) or names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        raise GraftError(f"setfit: the sentence-transformers body is {names}; graft folds Transformer, Pooling "
                         "(mean) and an optional Normalize only")
    pooling = modules[1]
    if pooling.pooling_mode != "mean":
        raise GraftError(f"setfit: the body pools {pooling.pooling_mode!r}; graft's classifier mean-pools "
                         "(a body with other pooling cannot be folded into it)")
    return modules[0].auto_model, len(modules) == 3


def head_weights(head: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted scikit-learn LogisticRegression's coef_ and intercept_ as graft's linear head
    [classes, hidden], [classes]: a binary problem's single row z becomes logits [0, z], whose
    softmax is sklearn's [1 - sigmoid(z), sigmoid(z)]."""
    classes = [int(c) for c in head.classes_]
    if classes != list(range(n_classes)):
        raise GraftError(f"setfit: the head was fitted on classes {classes}, expected 0..{n_classes - 1} "
                         "(every class needs train rows)")
    weight, bias = np.asarray(head.coef_, dtype=np.float64), np.asarray(head.intercept_, dtype=np.float64)
    if weight.shape[0] == 1:
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    return weight.astype(np.float32), bias.astype(np.float32)


def fold(model: Any, n_classes: int) -> tuple[torch.nn.Module, np.ndarray, np.ndarray, bool]:
    """The trained SetFitModel as (encoder, head weight, head bias, normalize): graft's
    MeanPoolingClassifier over these gives the probabilities `model.predict_proba` gives."""
    encoder, normalize = body_parts(model)
    weight, bias = head_weights(model.model_head, n_classes)
    return encoder, weight, bias, normalize
