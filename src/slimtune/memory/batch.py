"""The tokens a training step computes: how many rows, padded to what length, and how many
positions the loss trains on.

Without data the planner assumes the worst case a config allows: `batch_size` rows that fill
`max_length`, every position trained (text rows, or packing that fills every row). Given the
rows a run will really train on (tokenized, truncated and packed as `slimtune train` does), it
plans for the largest micro-batch those rows can make: the collator pads a batch to its longest
row, and the chunked loss computes only positions whose next token is trained, which with
prompts masked (chat and completion rows) is far fewer than the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimtune.tokens import IGNORE_INDEX

if TYPE_CHECKING:  # the planner reads a config's fields; it needs nothing else of train/
    from slimtune.train.config import TrainConfig

FULL_ROWS = "max_length"  # BatchShape.source of the data-free worst case


@dataclass(frozen=True)
class BatchShape:
    """The largest micro-batch of a run: `rows` rows padded to `length` tokens, `trained` of
    whose positions have a trained next token; `source`: the data file it was measured on, or
    FULL_ROWS."""

    rows: int
    length: int
    trained: int
    source: str = FULL_ROWS

    @property
    def tokens(self) -> int:
        """Positions the model's forward and backward pass compute, padding included."""
        return self.rows * self.length

    def to_dict(self) -> dict:
        return {"rows": self.rows, "length": self.length, "trained": self.trained,
                "source": self.source}  # fmt: skip


def full_rows(config: TrainConfig) -> BatchShape:
    """`batch_size` rows of `max_length` tokens, every next token trained."""
    rows, length = config.batch_size, config.max_length
    return BatchShape(rows, length, rows * (length - 1))


@dataclass(frozen=True)
class RowSizes:
    """Per training row: its tokens, and its positions whose next token is trained (what
    slimtune.train.loss computes: labels shifted by one, IGNORE_INDEX left out); and how many
    different token ids all rows hold (the embedding rows a run looks up)."""

    lengths: tuple[int, ...]
    trained: tuple[int, ...]
    source: str
    distinct_tokens: int = 0

    @classmethod
    def of(cls, examples: Iterable[dict], source: str) -> RowSizes:
        """From tokenized rows ({"input_ids", "labels"}), as the trainer batches them."""
        lengths, trained, seen = [], [], set()
        for example in examples:
            lengths.append(len(example["input_ids"]))
            trained.append(sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX))
            seen.update(example["input_ids"])
        if not lengths:
            raise ValueError("no rows")
        return cls(tuple(lengths), tuple(trained), source, len(seen))

    def largest_batch(self, config: TrainConfig) -> BatchShape:
        """The largest micro-batch any order of these rows can give under `config`: the
        longest row sets the padded length, the `batch_size` rows with the most trained
        positions the loss's (a bound: they need not be the same rows). A `max_length` below
        the rows' cuts them, and the positions past it are no longer trained."""
        length = min(max(self.lengths), config.max_length)
        rows = min(config.batch_size, len(self.lengths))
        most = sorted((min(t, length - 1) for t in self.trained), reverse=True)
        return BatchShape(rows, length, sum(most[:rows]), self.source)
