"""A preference task on SmolLM2: DPO turns the base's full-sentence answers into terse ones.

Short factual questions (capitals, opposites, plurals, past tenses, sums, the next month or
day). SmolLM2-135M-Instruct answers them in a full sentence ("The capital of Kenya is
Nairobi."): that is the rejected kind. The chosen kind says the same fact as "Answer: Nairobi.".
Both answers are right and only the kind differs. The base prefers the rejected one (it is
the more likely, and the base's greedy answers are sentences); DPO has to turn that around.

The pairs are written as JSONL ({"prompt", "chosen", "rejected"}), deterministic for a seed;
held-out pairs ask about facts no training pair mentions. The script then trains with
`slimtune train --objective dpo` (QLoRA, the CLI as a user runs it) and measures on the
held-out pairs, the base (adapter off) against the trained adapter, both computing in float32
from the 4-bit codes (as `slimtune generate` does by default):

    preference accuracy  the share of pairs whose chosen answer gets the higher implicit reward,
                         beta * (log p_policy - log p_ref) summed over the answer (DPO's own
                         measure; 0 for the base, whose rewards are all 0)
    log-prob preference  the share of pairs with log p(chosen) > log p(rejected) under the model
    greedy answers       the share of greedy answers (16 new tokens at most) of the chosen kind
                         ("Answer: ..." in at most six words), rambling ("Answer: ..." and
                         more) and other (anything else: the base's sentences); and the share that
                         names the fact at all (the chosen answer's key phrase, as a word)

    .venv/bin/python benchmarks/preference_task.py --out /tmp/preference-task
    .venv/bin/python benchmarks/preference_task.py --out DIR --data-only   # just the JSONL
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

CAPITALS = {"France": "Paris", "Kenya": "Nairobi", "Japan": "Tokyo", "Italy": "Rome",
            "Spain": "Madrid", "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo",
            "Canada": "Ottawa", "Germany": "Berlin", "Greece": "Athens", "Ireland": "Dublin",
            "Portugal": "Lisbon", "Poland": "Warsaw", "Austria": "Vienna", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
            "Thailand": "Bangkok", "Cuba": "Havana", "Chile": "Santiago", "Mexico": "Mexico City",
            "Argentina": "Buenos Aires", "Hungary": "Budapest", "Belgium": "Brussels",
            "Denmark": "Copenhagen", "Turkey": "Ankara", "Iran": "Tehran", "Vietnam": "Hanoi",
            "Australia": "Canberra"}  # fmt: skip
OPPOSITES = {"hot": "cold", "early": "late", "tall": "short", "happy": "sad", "fast": "slow",
             "light": "dark", "open": "closed", "full": "empty", "rich": "poor", "young": "old",
             "hard": "soft", "wet": "dry", "loud": "quiet", "strong": "weak", "up": "down",
             "push": "pull", "win": "lose", "heavy": "light", "thick": "thin", "clean": "dirty",
             "inside": "outside", "buy": "sell", "true": "false", "cheap": "expensive",
             "near": "far", "day": "night", "first": "last", "big": "small"}  # fmt: skip
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth",
           "woman": "women", "goose": "geese", "person": "people", "box": "boxes",
           "city": "cities", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "ox": "oxen",
           "cactus": "cacti", "baby": "babies", "bus": "buses", "fish": "fish", "sheep": "sheep",
           "potato": "potatoes", "half": "halves", "life": "lives", "church": "churches",
           "story": "stories", "wife": "wives"}  # fmt: skip
PAST = {"go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "swim": "swam",
        "buy": "bought", "think": "thought", "take": "took", "give": "gave", "fly": "flew",
        "sing": "sang", "drink": "drank", "speak": "spoke", "teach": "taught", "catch": "caught",
        "sleep": "slept", "build": "built", "find": "found", "drive": "drove", "break": "broke",
        "choose": "chose", "begin": "began", "bring": "brought"}  # fmt: skip
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def facts() -> list[tuple[str, str, str]]:
    """(question, full-sentence answer, the answer's key phrase) for every fact in the tables."""
    out = [(f"What is the capital of {c}?", f"The capital of {c} is {x}.", x)
           for c, x in CAPITALS.items()]  # fmt: skip
    out += [(f"What is the opposite of {w}?", f"The opposite of {w} is {x}.", x)
            for w, x in OPPOSITES.items()]  # fmt: skip
    out += [(f"What is the plural of {w}?", f"The plural of {w} is {x}.", x)
            for w, x in PLURALS.items()]  # fmt: skip
    out += [(f"What is the past tense of {w}?", f"The past tense of {w} is {x}.", x)
            for w, x in PAST.items()]  # fmt: skip
    out += [(f"Which month comes after {m}?", f"The month after {m} is {n}.", n)
            for m, n in zip(MONTHS, MONTHS[1:] + MONTHS[:1], strict=True)]  # fmt: skip
    out += [(f"Which day comes after {d}?", f"The day after {d} is {n}.", n)
            for d, n in zip(DAYS, DAYS[1:] + DAYS[:1], strict=True)]  # fmt: skip
    out += [(f"What is {a} plus {b}?", f"The sum of {a} and {b} is {a + b}.", str(a + b))
            for a in range(2, 14) for b in range(3, 10, 2)]  # fmt: skip
    return out


def pairs(seed: int = 0, held_out: int = 48) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows: every fact once, shuffled by `seed`; the last
    `held_out` facts are the held-out split."""
    rows = [
        {"prompt": question, "chosen": f"Answer: {key}.", "rejected": sentence}
        for question, sentence, key in facts()
    ]
    random.Random(seed).shuffle(rows)
    return rows[:-held_out], rows[-held_out:]


def answer_kind(text: str) -> str:
    """The kind of a greedy answer: chosen ("Answer: ..." in at most six words), rambling
    ("Answer: ..." and more) or other (anything else; the base's sentences among them)."""
    text = text.strip()
    if not text.startswith("Answer:"):
        return "other"
    return "chosen" if len(text.split()) <= 6 else "rambling"


def states_the_fact(text: str, row: dict) -> bool:
    """The answer names the fact's key phrase (the chosen answer's, "Answer: <key>.")."""
    key = row["chosen"].removeprefix("Answer: ").removesuffix(".")
    return re.search(rf"\b{re.escape(key)}\b", text) is not None


def write_data(folder: Path, seed: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, rows in zip(paths, pairs(seed), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


# ----------------------------------------------------------------------------- measuring


def measure(model, tokenizer, rows: list[dict], beta: float, adapter: bool) -> dict:
    """Preference accuracy, log-prob preference and greedy answers on `rows`, with the
    adapter on (the trained policy) or off (the base)."""
    from slimtune.data import load_preference_dataset, pad_token_id
    from slimtune.infer.generation import evaluation, format_prompt, greedy_answers
    from slimtune.train.preference import adapter_off, cache_reference, pair_logps

    pad = pad_token_id(tokenizer)
    encoded = load_preference_dataset(rows, tokenizer, max_length=256).train
    cache_reference(model, encoded, pad)  # the adapter switched off
    prompts = [format_prompt(tokenizer, row["prompt"]) for row in rows]
    with evaluation(model), contextlib.nullcontext() if adapter else adapter_off(model):
        policy = [pair_logps(model, [pair], pad) for pair in encoded]
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=16)
    chosen = [float(x["chosen"][0]) for x in policy]
    rejected = [float(x["rejected"][0]) for x in policy]
    margins = [
        beta * ((c - pair["ref_chosen_logps"]) - (r - pair["ref_rejected_logps"]))
        for c, r, pair in zip(chosen, rejected, encoded, strict=True)
    ]
    kinds = [answer_kind(a) for a in answers]
    n = len(rows)
    return {
        "pairs": n,
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "logprob_preference": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        "logps_chosen": sum(chosen) / n,
        "logps_rejected": sum(rejected) / n,
        **{f"greedy_{kind}": kinds.count(kind) / n for kind in ("chosen", "rambling", "other")},
        "greedy_states_the_fact": sum(map(states_the_fact, answers, rows)) / n,
        "answers": [[row["prompt"], a] for row, a in zip(rows, answers, strict=True)],
    }


def eval_curve(run: Path) -> list[dict]:
    """The held-out evaluations `slimtune train` logged (step, preference accuracy, ...)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_reward_accuracy" in r]


def train_command(args: argparse.Namespace, train: Path, held_out: Path, output: Path) -> list[str]:
    return [
        "slimtune", "train",
        "--objective", "dpo", "--method", "qlora", "--data", str(train),
        "--eval-data", str(held_out), "--beta", str(args.beta), "--lr", str(args.lr),
        "--epochs", str(args.epochs), "--max-steps", str(args.steps),
        "--batch-size", str(args.batch), "--rank", str(args.rank), "--alpha", str(args.alpha),
        "--max-length", "128", "--warmup-steps", "0",
        "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--output", str(output),
        "--no-progress",
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for data and the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3, help="at most; --steps stops first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--data-only", action="store_true")
    args = parser.parse_args()
    train, held_out = write_data(args.out, args.seed)
    if args.data_only:
        return 0
    from slimtune.runtime import tune_process

    tune_process()  # passive OpenMP waits, as `slimtune` itself runs (before torch loads)
    import torch

    from slimtune.hardware import machine_summary
    from slimtune.train.generation import load_for_inference

    output = args.out / "run"
    command = train_command(args, train, held_out, output)
    print("$", shlex.join(command), flush=True)
    began = time.perf_counter()
    # `slimtune train` as this interpreter runs it: the same environment as the measurements.
    subprocess.run([sys.executable, "-m", "slimtune", *command[1:]], check=True)
    seconds = time.perf_counter() - began
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    model, tokenizer = load_for_inference(None, str(output), compute_dtype=torch.float32)
    result = {
        "machine": machine_summary(),
        "command": shlex.join(command),
        "train_seconds": seconds,
        "evals": eval_curve(output),
        "base": measure(model, tokenizer, rows, args.beta, adapter=False),
        "dpo": measure(model, tokenizer, rows, args.beta, adapter=True),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    for name in ("base", "dpo"):
        summary = {k: v for k, v in result[name].items() if k != "answers"}
        print(name, json.dumps(summary))
        for prompt, answer in result[name]["answers"][:6]:
            print(f"   {prompt!r} -> {answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
