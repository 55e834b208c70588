"""The model users load from the registry: texts in, labels and class probabilities out.

MLflow logs this file as "model from code" (`mlflow.pyfunc.log_model(python_model=<this file>)`),
so nothing is pickled: loading runs this code and reads safetensors weights from the model
folder artifact. It imports only what the pinned serving requirements install (no graft), so
`mlflow models serve` works in any environment that has them.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

TEXT_COLUMN = "text"
MODEL_ARTIFACT = "model"
BATCH_SIZE = 32


def probability_column(label: str) -> str:
    return f"probability_{label}"


class TextClassifier(mlflow.pyfunc.PythonModel):
    """A fine-tuned sequence classifier: `label`, its `probability`, and one column per class."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts[MODEL_ARTIFACT]))

    def load(self, model_dir: Path) -> TextClassifier:
        """Tokenizer and weights from a local folder (safetensors only; never a hub lookup)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True, local_files_only=True).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length = min(int(getattr(self.model.config, "max_position_embeddings", 512)), 512)
        self._torch = torch
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = self.tokenizer(texts[start:start + BATCH_SIZE], truncation=True, padding=True,
                                       max_length=self.max_length, return_tensors="pt")
                rows.append(torch.softmax(self.model(**batch).logits.float(), dim=-1).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            column = TEXT_COLUMN if TEXT_COLUMN in model_input.columns else model_input.columns[0]
            texts = model_input[column].astype(str).tolist()
        else:  # a list of strings or a Series
            texts = [str(t) for t in model_input]
        proba = self.predict_proba(texts)
        best = proba.argmax(1) if len(texts) else np.zeros(0, dtype=int)
        out = pd.DataFrame({"label": [self.labels[i] for i in best],
                            "probability": proba[np.arange(len(texts)), best].astype(float)})
        for i, label in enumerate(self.labels):
            out[probability_column(label)] = proba[:, i].astype(float)
        return out


mlflow.models.set_model(TextClassifier())
