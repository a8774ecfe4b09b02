"""The bundled demo data set: find dates written many ways and rewrite them as YYYY-MM-DD.

Every row is a chat (`messages`): a short system instruction, a one-sentence user message that
mentions one date in one of several spellings ("the 5th of March, 2021", "Fri, Mar 5 2021", ...),
and the answer, the same date in ISO 8601 form ("2021-03-05"). The answer is short and checked by
exact match, the base SmolLM2-135M-Instruct does poorly on it (it chats, or gets the month or day
wrong), and a few minutes of LoRA on a CPU teaches it.

The files are made by `generate()` from a fixed seed; `python -m slimtune.data.demo` rewrites
them byte for byte (a test checks this). Train and test rows never share a date.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

from slimtune.errors import SlimtuneError

SEED = 1234
N_TRAIN = 360
N_TEST = 80
SYSTEM = "Write the date as YYYY-MM-DD."

_MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
_WEEKDAYS = [dt.date(2024, 1, d).strftime("%A") for d in range(1, 8)]  # 2024-01-01 is a Monday

# How a date may be written. Each is unambiguous: month names, or year first.
_SPELLINGS = [
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{_WEEKDAYS[d.weekday()]}, {_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{_WEEKDAYS[d.weekday()][:3]}, {_MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.year}/{d.month}/{d.day}",
    lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
]

_SENTENCES = [
    "Invoice paid on {}.",
    "The meeting moved to {}.",
    "She was born on {}.",
    "Deadline: {}.",
    "Shipped {}, arrived late.",
    "We signed the lease on {}.",
    "Next dentist visit is {}.",
    "Report filed {}.",
    "{} was the launch day.",
    "Posted on {}.",
]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _row(rng: random.Random, date: dt.date) -> dict:
    spelled = rng.choice(_SPELLINGS)(date)
    sentence = rng.choice(_SENTENCES).format(spelled)
    sentence = sentence[0].upper() + sentence[1:]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict:
    """Rows of the demo set: {"train": [...], "test": [...]}, deterministic for a seed."""
    rng = random.Random(seed)
    first, last = dt.date(1950, 1, 1).toordinal(), dt.date(2035, 12, 31).toordinal()
    ordinals = rng.sample(range(first, last + 1), n_train + n_test)  # distinct dates
    dates = [dt.date.fromordinal(o) for o in ordinals]
    rows = [_row(rng, d) for d in dates]
    return {"train": rows[:n_train], "test": rows[n_train:]}


def demo_data_path(split: str) -> Path:
    """Path of the bundled demo file for `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise SlimtuneError(f"demo split must be 'train' or 'test', got {split!r}")
    return Path(__file__).with_name(f"{split}.jsonl")


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_demo_files(directory: Path | None = None) -> list[Path]:
    """Write train.jsonl and test.jsonl (the bundled files unless `directory` is given)."""
    directory = Path(directory) if directory is not None else Path(__file__).parent
    written = []
    for split, rows in generate().items():
        path = directory / f"{split}.jsonl"
        path.write_text(to_jsonl(rows), encoding="utf-8")
        written.append(path)
    return written
