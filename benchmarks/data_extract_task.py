"""A second fine-tuning task, unlike the demo's date rewriting: pull a person's name, city and
age out of a sentence into a fixed JSON object. Written as chat rows (system, user, assistant),
deterministic for a seed; the base SmolLM2 answers in prose, so exact match starts near 0%.

    .venv/bin/python benchmarks/data_extract_task.py OUT_DIR   # writes train.jsonl, test.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Lucas", "Sofia", "Ivan",
         "Chloe", "Mateo", "Nora", "Ravi", "Elena", "Jonas", "Amara", "Felix", "Yuki", "Hugo"]  # fmt: skip
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Cairo", "Oslo", "Dublin",
          "Hanoi", "Quito", "Perth", "Seville", "Tunis", "Krakow", "Austin", "Porto", "Riga"]  # fmt: skip
TEMPLATES = [
    "{name} from {city} turned {age} last week.",
    "Meet {name}, {age}, who lives in {city}.",
    "At {age}, {name} moved to {city} for work.",
    "{city} is home to {name}, aged {age}.",
    "Our new member is {name} ({age}) from {city}.",
    "{name} just celebrated a {age}th birthday in {city}.",
]
SYSTEM = 'Extract the person as JSON: {"name": ..., "city": ..., "age": ...}.'


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        text = rng.choice(TEMPLATES).format(name=name, city=city, age=age)
        answer = json.dumps({"name": name, "city": city, "age": age})
        out.append({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": text},
                                 {"role": "assistant", "content": answer}]})  # fmt: skip
    return out


def main() -> int:
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in [("train", 360, 0), ("test", 80, 1)]:
        lines = "".join(json.dumps(row) + "\n" for row in rows(n, seed))
        (folder / f"{split}.jsonl").write_text(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
