"""The `setfit` strategy's library side: contrastive fine-tuning of a sentence-transformer body
with the setfit library, and the fold that turns the trained body and its logistic-regression
head into graft's own classifier (graft.modeling.MeanPoolingClassifier), so that what is saved,
evaluated and served is a plain graft model folder and setfit is needed only to train.

setfit, sentence-transformers and datasets are imported inside the functions: the train stage
imports this module whatever it trains, and only the setfit strategy pays for them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.truncation import tokenize as truncate_tokenize


def load_setfit_model(model_dir: Path, *, max_length: int, truncation: str, trust_remote_code: bool = False) -> Any:
    """A SetFitModel on a local folder: a sentence-transformers folder as it is, a plain encoder
    folder under mean pooling (sentence-transformers' default). Its body reads `max_length`
    tokens of each text, cut as `truncation` says (graft.truncation, what the folded model and
    the served one read), in the contrastive phase as in `encode`."""
    from setfit import SetFitModel

    model = SetFitModel.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    model.model_body.max_seq_length = max_length
    if truncation != "head":  # head: sentence-transformers' own cut (longest_first at max_length) is graft's
        _cut_as_graft_does(model.model_body[0], max_length=max_length, truncation=truncation)
    return model


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
