"""A child process for the resume and DDP tests: fits the tiny model with `graft.training.fit`
(also under torchrun), optionally SIGKILLs itself inside optimizer step N, and writes the final
trainable weights (safetensors) and the history (JSON)."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from graft.modeling import build_classifier, load_tokenizer, seed_everything
from graft.training import FitSettings, dist_env, fit, init_distributed, prepare_strategy

NEWS_CSV = Path(__file__).parent / "fixtures" / "news_tiny.csv"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--no-dropout", action="store_true")
    args = parser.parse_args()

    device = init_distributed()
    frame = pd.read_csv(NEWS_CSV)
    classes = sorted(frame["label"].unique())
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    seed_everything(0)
    model = build_classifier(Path(args.model), classes=classes)
    if args.no_dropout:  # dropout draws differ per rank: DDP equals one process only without it
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model, frozen, groups = prepare_strategy(model, "partial", freeze_layers=1, lr=5e-3, weight_decay=0.01)
    if args.kill_at_step:
        original, calls = torch.optim.AdamW.step, {"n": 0}

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)

        torch.optim.AdamW.step = step
    settings = FitSettings(lr=5e-3, epochs=2, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                           max_length=32, seed=0, checkpoint_every=args.checkpoint_every, eval_batch_size=8,
                           precision="fp32")
    result = fit(model, load_tokenizer(Path(args.model)), train_texts=frame["text"][:30].tolist(),
                 train_labels=labels[:30], val_texts=frame["text"][30:].tolist(), val_labels=labels[30:],
                 settings=settings, param_groups=groups, device=device, freeze_layers=frozen,
                 checkpoint_dir=Path(args.checkpoints) if args.checkpoints else None, fingerprint="test", desc="child")
    if dist_env()[0] == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(out / "weights.safetensors"))
        (out / "history.json").write_text(json.dumps(result["history"]))


if __name__ == "__main__":
    main()
