"""adapt: continued masked-LM pretraining of the fetched backbone on the unlabelled target-domain
text plus the training split's texts (task-adaptive pretraining), written as a plain model folder
(safetensors, tokenizer) that train fine-tunes `adapt.strategy` from. Without `mlm` in
adapt.methods the stage writes only a note that nothing was adapted (seconds, no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from graft import config
from graft.errors import exits_cleanly
from graft.files import atomic_path, write_json
from graft.layout import Layout, require
from graft.lengths import resolved_tokenization

STATE_FILE = "adapt.json"


def adapt_texts(unlabelled: pd.DataFrame, train: pd.DataFrame, *, max_texts: int, seed: int) -> list[str]:
    """At most `max_texts` unlabelled texts (a seeded sample, in file order) plus every train text."""
    if len(unlabelled) > max_texts:
        keep = np.sort(np.random.default_rng(seed).choice(len(unlabelled), size=max_texts, replace=False))
        unlabelled = unlabelled.iloc[keep]
    return unlabelled["text"].tolist() + train["text"].tolist()


def adapt(params: config.Params, *, layout: Layout) -> dict:
    """Write models/adapted/ (or, when mlm is off, only its note) and reports/adapt.json."""
    a, trust = params.adapt, params.model.trust_remote_code
    if "mlm" not in a.methods:
        state = {"method": None, "note": "adapt.methods has no mlm: nothing adapted"}
        with atomic_path(layout.adapted_dir) as tmp:
            tmp.mkdir()
            write_json(tmp / STATE_FILE, state)
        write_json(layout.adapt_report, state)
        return state
    # torch and transformers only past the off switch: a stage that is off costs its interpreter
    # start, not the 10 s of those imports
    from graft.adaptation import adapted_encoder, load_masked_lm, mlm_pretrain
    from graft.modeling import load_tokenizer, seed_everything, select_device

    require(layout.unlabelled_file, layout.split_file("train"), layout.pretrained_dir, root=layout.root)
    texts = adapt_texts(pd.read_parquet(layout.unlabelled_file), pd.read_parquet(layout.split_file("train")),
                        max_texts=a.mlm.max_texts, seed=params.seed)
    tokens = resolved_tokenization(params, layout)  # the length and truncation the features stage embedded with
    tokenizer = load_tokenizer(layout.pretrained_dir, trust_remote_code=trust)
    # seed before building: a head the checkpoint lacks is initialised the same way every run
    seed_everything(params.seed)
    model, initialised = load_masked_lm(layout.pretrained_dir, trust_remote_code=trust)
    m = a.mlm
    warmup = m.head_warmup_epochs if initialised else 0  # a head the checkpoint carried needs none
    facts = mlm_pretrain(model, tokenizer, texts, epochs=m.epochs, lr=m.lr, batch_size=m.batch_size,
                         mask_probability=m.mask_probability, max_length=tokens.max_length,
                         truncation=tokens.truncation, seed=params.seed, device=select_device(),
                         head_warmup_epochs=warmup, head_warmup_lr=m.head_warmup_lr)
    encoder = adapted_encoder(model.cpu(), layout.pretrained_dir, trust_remote_code=trust)
    state = {"method": "mlm", "texts": facts["texts"], "unlabelled_texts": facts["texts"] - len(
        pd.read_parquet(layout.split_file("train"), columns=["id"])), "epochs": m.epochs, "lr": m.lr,
        "mask_probability": m.mask_probability, "max_length": tokens.max_length, "truncation": tokens.truncation,
        "seed": params.seed,
        "head_initialised": initialised, "head_warmup_epochs": warmup,
        "note": ("the backbone's folder had no masked-LM head weights for " + ", ".join(initialised)
                 + f": initialised, then trained alone for {warmup} epoch(s) before pretraining") if initialised else "masked-LM head loaded from the backbone"}
    with atomic_path(layout.adapted_dir) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / STATE_FILE, state)
    write_json(layout.adapt_report, {**state, **facts})
    return {**state, **facts}


@exits_cleanly
def main() -> None:
    result = adapt(config.load(), layout=Layout())
    if result["method"] is None:
        print(f"adapt: {result['note']}")  # noqa: T201
        return
    losses = ", ".join(f"{v:.3f}" for v in result["epoch_loss"])
    if result["head_warmup_loss"]:
        losses = "head warm-up " + ", ".join(f"{v:.3f}" for v in result["head_warmup_loss"]) + "; " + losses
    print(f"adapt: masked-LM pretraining on {result['texts']} texts ({result['unlabelled_texts']} unlabelled), "  # noqa: T201
          f"{result['seconds']}s, loss per epoch {losses}; {result['note']}")


if __name__ == "__main__":
    main()

