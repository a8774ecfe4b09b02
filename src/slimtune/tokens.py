"""What every package agrees on about tokens: the label that the loss skips, the id to pad with,
whether a tokenizer has a chat template."""

from __future__ import annotations

# The label of a token the loss does not cover (prompt, padding): torch's cross-entropy default.
IGNORE_INDEX = -100


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (also without a
    tokenizer): pads are never trained on nor attended to."""
    for token_id in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if token_id is not None:
            return int(token_id)
    return 0


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
