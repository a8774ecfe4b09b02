"""User data to training batches: read, detect the format, render, mask, truncate, pad, pack.

    splits = load_dataset("train.jsonl", tokenizer, max_length=256, eval_fraction=0.1)
    batch = Collator(pad_token_id(tokenizer))(splits.train[:8])

See docs/data.md for the formats and the masking rules.
"""

from slimtune.data.collate import Collator, pack
from slimtune.data.dataset import DatasetSplits, load_dataset, split_examples
from slimtune.data.demo import demo_data_path
from slimtune.data.encode import encode
from slimtune.data.formats import FORMATS, PreferencePair, detect_format, to_pair
from slimtune.data.preference import load_preference_dataset
from slimtune.data.reading import BadRow, read_rows
from slimtune.data.render import render, split_prompt_answer
from slimtune.tokens import IGNORE_INDEX, pad_token_id

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BadRow",
    "Collator",
    "DatasetSplits",
    "demo_data_path",
    "detect_format",
    "encode",
    "load_dataset",
    "pack",
    "PreferencePair",
    "load_preference_dataset",
    "pad_token_id",
    "read_rows",
    "render",
    "split_examples",
    "split_prompt_answer",
    "to_pair",
]
