"""Turn a growing list of token ids into text deltas, honouring stop strings.

Text is decoded from all ids each time (decoding piece by piece breaks multi-byte characters and
tokenizers that merge spaces); a trailing replacement character means "wait for more bytes", and
the last few characters are held back while they could still become a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the whole text so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to send, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush(), True
        self.text = text
        safe = len(text.rstrip("\ufffd")) - self.holdback
        return self._take(max(safe, self.sent)), False

    def flush(self) -> str:
        """Everything not sent yet (at the end of generation)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
