"""Which tokens of a long text the model sees: the head, the tail, or the head and the tail.

One function, `tokenize`, turns texts into token ids for every stage (features, train, evaluate,
through `graft.modeling.tokenize`) and for the served model (`graft/serving.py`, which MLflow
loads without graft installed: this file is logged with the model as code, so it imports nothing
but the standard library).

- `head` keeps the first `max_length` tokens (the tokenizer's own truncation, as graft always did);
- `tail` keeps the last ones;
- `head_tail` keeps the first quarter and the last three quarters of the window (Sun et al. 2019,
  "How to Fine-Tune BERT for Text Classification?", found 128 head + 382 tail tokens of 512 best
  on long reviews: the opening states the topic, the end the verdict).

The special tokens ([CLS] ... [SEP]) stay where the tokenizer put them; only the text between them
is cut. A text that fits is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

TRUNCATIONS = ("head", "tail", "head_tail")
# head_tail: the share of the window (without special tokens) taken from the text's start
HEAD_SHARE = 0.25


def head_tokens(window: int, truncation: str) -> int:
    """How many of `window` text tokens (special tokens aside) come from the start of the text."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r}: expected one of {list(TRUNCATIONS)}")
    return {"head": window, "tail": 0, "head_tail": int(window * HEAD_SHARE)}[truncation]


def keep_window(ids: Sequence[int], special_mask: Sequence[int], *, max_length: int, truncation: str) -> list[int]:
    """`ids` (one text, special tokens included, untruncated) cut to `max_length` tokens: the
    leading and trailing special tokens, then the text's head and/or tail as `truncation` says."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    lead = 0
    while lead < len(ids) and special_mask[lead]:
        lead += 1
    trail = 0
    while trail < len(ids) - lead and special_mask[len(ids) - 1 - trail]:
        trail += 1
    window = max_length - lead - trail
    if window < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text beside {lead + trail} special tokens")
    text = ids[lead:len(ids) - trail]
    head = head_tokens(window, truncation)
    tail = window - head
    return ids[:lead] + text[:head] + text[len(text) - tail:] + ids[len(ids) - trail:]


def tokenize(tokenizer, texts: Sequence[str], *, max_length: int, truncation: str) -> list[list[int]]:
    """Token ids per text (special tokens included), at most `max_length` each, cut as
    `truncation` says; padding happens per batch."""
    if truncation == "head":
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    head_tokens(max_length, truncation)  # a wrong name fails before any tokenizing
    # verbose=False: untruncated texts longer than the model's positions are expected here
    encoded = tokenizer(list(texts), truncation=False, return_special_tokens_mask=True, verbose=False)
    return [keep_window(ids, mask, max_length=max_length, truncation=truncation)
            for ids, mask in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True)]
