"""The six row formats: detect them from the columns, check a row, bring it to one shape.

    text        {"text": ...}                                    trained on everything
    completion  {"prompt": ..., "completion": ...}
    alpaca      {"instruction": ..., "input": ... (optional), "output": ...}
    messages    {"messages": [{"role": "user", "content": ...}, ...]}        (OpenAI style)
    sharegpt    {"conversations": [{"from": "human", "value": ...}, ...]}
    preference  {"chosen": ..., "rejected": ..., "prompt": ... (optional)}  (see to_pair)

Supervised training on preference rows learns the chosen answers; DPO and ORPO read them
through preference.py. A checked row becomes an `Example`: either plain `text`, or a `prompt` and an `answer`
(completion, alpaca), or a list of chat `messages` with roles system/user/assistant.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from slimtune.data.reading import BadRow

FORMATS = ("text", "completion", "alpaca", "messages", "sharegpt", "preference")

# The columns that identify a format, checked in this order (chat columns win).
_SIGNATURES = [
    ("preference", {"chosen", "rejected"}),
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("completion", {"prompt", "completion"}),
    ("text", {"text"}),
]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass
class Example:
    """A checked row. Exactly one of: `text`; `prompt` + `answer`; `messages`."""

    fmt: str
    text: str | None = None
    prompt: str | None = None
    answer: str | None = None
    context: str | None = None  # alpaca's optional `input`
    messages: list[dict] | None = None

    def chat_messages(self) -> list[dict]:
        """The example as chat turns (prompt/answer rows become one user and one assistant turn)."""
        if self.messages is not None:
            return self.messages
        if self.prompt is None:
            raise BadRow("a text row has no prompt and answer to render as chat turns")
        user = f"{self.prompt}\n\n{self.context}" if self.context else self.prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.answer}]


def detect_format(row: dict) -> str:
    """The format of a row, from its columns: text, completion, alpaca, messages or sharegpt."""
    for fmt, columns in _SIGNATURES:
        if columns <= row.keys():
            return fmt
    raise BadRow(
        f"cannot tell the format from the columns {sorted(row)}; expected one of: text; "
        "prompt + completion; instruction + output (alpaca); messages; conversations (sharegpt); "
        "chosen + rejected (preference)"
    )


def detect_dataset_format(rows: list[dict], where: str = "data") -> str:
    """The most common format among rows (so one broken row does not decide it)."""
    votes = Counter()
    for row in rows:
        try:
            votes[detect_format(row)] += 1
        except BadRow:
            continue
    if not votes:
        columns = sorted(rows[0]) if rows else []
        raise BadRow(f"{where}: cannot tell the data format from the columns {columns}")
    return votes.most_common(1)[0][0]


def check_format_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadRow(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def to_example(row: dict, fmt: str | None = None, where: str = "row") -> Example:
    """Check `row` against `fmt` (detected when None) and normalize it; BadRow if it is broken."""
    fmt = check_format_name(fmt) if fmt else _detect(row, where)
    if fmt == "text":
        return Example(fmt, text=_string(row, "text", where))
    if fmt == "completion":
        prompt = _string(row, "prompt", where, allow_empty=True)
        return Example(fmt, prompt=prompt, answer=_answer(row, "completion", where))
    if fmt == "alpaca":
        instruction = _string(row, "instruction", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _wrong_type(where, "input", "a string", extra)
        context = extra if extra and extra.strip() else None
        return Example(
            fmt, prompt=instruction, context=context, answer=_answer(row, "output", where)
        )
    if fmt == "messages":
        return Example(fmt, messages=_messages(row, where, "messages", "role", "content", None))
    if fmt == "preference":
        return to_pair(row, where).example("chosen")
    return Example(
        fmt, messages=_messages(row, where, "conversations", "from", "value", SHAREGPT_ROLES)
    )


def _detect(row: dict, where: str) -> str:
    try:
        return detect_format(row)
    except BadRow as e:
        raise BadRow(f"{where}: {e}") from None


def _string(row: dict, field: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(field)
    if value is None:
        raise BadRow(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise _wrong_type(where, field, "a string", value)
    if not allow_empty and not value.strip():
        raise BadRow(f"{where}: field {field!r} is empty")
    return value


def _answer(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if isinstance(value, str) and not value.strip():
        raise BadRow(f"{where}: field {field!r}: empty answer")
    return _string(row, field, where)


def _wrong_type(where: str, field: str, expected: str, value: Any) -> BadRow:
    return BadRow(f"{where}: field {field!r}: expected {expected}, got {type(value).__name__}")


def _messages(
    row: dict,
    where: str,
    field: str,
    role_key: str,
    text_key: str,
    role_map: dict | None,
    need_assistant: bool = True,
) -> list[dict]:
    turns = row.get(field)
    if turns is None:
        raise BadRow(f"{where}: missing field {field!r}")
    if not isinstance(turns, list) or not turns:
        raise _wrong_type(where, field, "a non-empty list of turns", turns)
    messages = []
    for i, turn in enumerate(turns):
        name = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise _wrong_type(where, name, "an object", turn)
        role = turn.get(role_key)
        if role is None:
            raise BadRow(f"{where}: missing field '{name}.{role_key}'")
        known = role_map or dict.fromkeys(ROLES)
        if role not in known:
            raise BadRow(
                f"{where}: field '{name}.{role_key}': unknown role {role!r} "
                f"(expected one of {', '.join(known)})"
            )
        role = role_map[role] if role_map else role
        content = _content(turn.get(text_key), where, f"{name}.{text_key}")
        if role == "assistant" and not content.strip():
            raise BadRow(f"{where}: field '{name}.{text_key}': empty answer")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"{where}: field {field!r}: no assistant turn, so nothing to learn")
    return messages


def _content(value: Any, where: str, name: str) -> str:
    """A turn's text; OpenAI's list of text parts is joined."""
    if value is None:
        raise BadRow(f"{where}: missing field {name!r}")
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise _wrong_type(where, name, "a string", value)
    return value


# ------------------------------------------------------------------------- preference rows
# The row shapes TRL's preference data sets use (preference.py's docstring lists them).

SIDES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """A checked row: the prompt and the two answers, as text or as chat turns."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def is_chat(self) -> bool:
        return any(isinstance(part, list) for part in (self.prompt, self.chosen, self.rejected))

    def example(self, side: str) -> Example:
        """One side as an Example that render() understands (prompt + answer, or chat turns)."""
        answer = getattr(self, side)
        if not self.is_chat:
            return Example("completion", prompt=self.prompt, answer=answer)
        return Example("messages", messages=_as_turns(self.prompt, "user") + _as_turns(answer))

    def prompt_turns(self) -> list[dict]:
        return _as_turns(self.prompt, "user")


def _as_turns(part: str | list[dict], role: str = "assistant") -> list[dict]:
    if isinstance(part, list):
        return part
    return [{"role": role, "content": part}] if part else []


def to_pair(row: dict, where: str = "row") -> PreferencePair:
    """Check a preference row and normalize it; BadRow naming `where` and the field if broken."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected an object (a dict of fields), got {type(row).__name__}")
    for name in SIDES:
        if name not in row:
            raise BadRow(f"{where}: missing field {name!r}")
    prompt = row.get("prompt")
    if prompt is None:
        if not all(isinstance(row[name], list) for name in SIDES):
            raise BadRow(
                f"{where}: missing field 'prompt' (needed unless 'chosen' and 'rejected' are "
                "whole conversations that share their first turns)"
            )
        chosen, rejected = (_turns(row, name, where) for name in SIDES)
        shared = _shared_prefix(chosen, rejected)
        if shared == 0:
            raise BadRow(f"{where}: 'chosen' and 'rejected' share no first turn to use as prompt")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            _check_answer_turns(answer, where, name)
    else:
        prompt = _prompt(row, where)
        chosen, rejected = (_pair_answer(row, name, where) for name in SIDES)
    if chosen == rejected:
        raise BadRow(f"{where}: 'chosen' and 'rejected' are the same answer")
    return PreferencePair(prompt, chosen, rejected)


def _prompt(row: dict, where: str) -> str | list[dict]:
    if isinstance(row["prompt"], list):
        return _turns(row, "prompt", where, need_assistant=False)
    return _string(row, "prompt", where, allow_empty=True)


def _pair_answer(row: dict, name: str, where: str) -> str | list[dict]:
    if isinstance(row[name], list):
        turns = _turns(row, name, where)
        _check_answer_turns(turns, where, name)
        return turns
    return _string(row, name, where)


def _turns(row: dict, name: str, where: str, need_assistant: bool = True) -> list[dict]:
    """The turns of a list field, in either turn style, checked like SFT's chat rows."""
    value = row[name]
    sharegpt = bool(value) and isinstance(value[0], dict) and "from" in value[0]
    keys = ("from", "value", SHAREGPT_ROLES) if sharegpt else ("role", "content", None)
    return _messages(row, where, name, *keys, need_assistant=need_assistant)


def _check_answer_turns(turns: list[dict], where: str, name: str) -> None:
    if not turns:
        raise BadRow(f"{where}: field {name!r}: no turn after the prompt, so no answer")
    if turns[0]["role"] != "assistant":
        raise BadRow(f"{where}: field {name!r}: the answer must start with an assistant turn")


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
