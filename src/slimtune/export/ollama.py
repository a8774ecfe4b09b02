"""An Ollama Modelfile for an exported GGUF: FROM, ADAPTER, TEMPLATE and stop parameters.

Ollama's TEMPLATE is a Go template, not the Jinja chat template the tokenizer carries. The Go
template is derived by rendering the Jinja template on marker messages and cutting out what it
puts around each role's content (and any default system turn it adds), then checked: the pieces
must rebuild the Jinja rendering of longer conversations exactly. A template that is not a
sequence of per-message wrappers fails the check and the Modelfile is written without TEMPLATE
(Ollama then falls back to the chat template inside the GGUF); the caller is told why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from slimtune.files import write_text

SYS, USER, ASSISTANT = "SLIMTUNE_SYSTEM_MARK", "SLIMTUNE_USER_MARK", "SLIMTUNE_ASSISTANT_MARK"


@dataclass
class ChatPieces:
    """What a chat template puts around each message (before, after), the default system turn
    it adds when the conversation has none, and the generation prompt. `user_after_system`:
    how the user message after a leading system message opens, where the template runs the
    system text into that turn (Gemma's); None where it opens as any other."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    default_system: str
    generation: str
    user_after_system: str | None = None

    def render(self, messages: list[dict]) -> str:
        """The prompt these pieces give, with the generation prompt (as Ollama renders it)."""
        leading_system = bool(messages) and messages[0]["role"] == "system"
        text = "" if leading_system else self.default_system
        for i, message in enumerate(messages):
            before, after = getattr(self, message["role"])
            if leading_system and i == 1 and message["role"] == "user":
                before = before if self.user_after_system is None else self.user_after_system
            text += before + message["content"] + after
        return text + self.generation

    def without_bos(self, bos: str) -> ChatPieces:
        """These pieces without the BOS token they open a prompt with, for a runtime that adds
        it itself (llama.cpp and Ollama do, where the GGUF says so): no second BOS."""
        before, after = self.system
        return replace(
            self,
            system=(before.removeprefix(bos), after),
            default_system=self.default_system.removeprefix(bos),
        )

    def go_template(self) -> str:
        """The same as an Ollama (Go) template, written without whitespace-trimming markers
        so that the literal pieces keep every newline."""

        def wrap(role: str, opening: str) -> str:
            after = getattr(self, role)[1]
            return (
                f'{{{{ if eq $m.Role "{role}" }}}}{opening}{{{{ $m.Content }}}}{after}{{{{ end }}}}'
            )

        user_opening = self.user[0]
        if self.user_after_system is not None:  # the leading system text opened this turn
            user_opening = (
                '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
                f"{self.user_after_system}{{{{ else }}}}{user_opening}{{{{ end }}}}"
            )
        return (
            "{{ range $i, $m := .Messages }}"
            f'{{{{ if and (eq $i 0) (ne $m.Role "system") }}}}{self.default_system}{{{{ end }}}}'
            + wrap("system", self.system[0]) + wrap("user", user_opening)
            + wrap("assistant", self.assistant[0]) + "{{ end }}" + self.generation
        )  # fmt: skip


def _split(text: str, mark: str) -> tuple[str, str]:
    before, found, after = text.partition(mark)
    if not found:
        raise ValueError(f"the template drops the content {mark}")
    return before, after


def chat_pieces(tokenizer) -> ChatPieces:
    """Cut a Jinja chat template into per-role pieces; ValueError when it does not fit."""

    def render(messages: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    system = {"role": "system", "content": SYS}
    user = {"role": "user", "content": USER}
    assistant = {"role": "assistant", "content": ASSISTANT}
    one, two = render([user]), render([user, assistant])
    three = render([user, assistant, user])
    for longer, shorter in [(two, one), (three, two)]:
        if not longer.startswith(shorter):
            raise ValueError("a later message changes what the template wrote for earlier ones")
    opening, user_after = _split(one, USER)  # the default system turn, then the user's opening
    user_before, again = _split(three[len(two) :], USER)
    if again != user_after or not opening.endswith(user_before):
        raise ValueError("the first user turn is written differently from later ones")
    system_before, rest = _split(render([system, user]), SYS)
    between, again = _split(rest, USER)
    if again != user_after:
        raise ValueError("a system message changes how the user turn ends")
    # Between the system text and the user's: the system turn's end and the user's opening,
    # or (Gemma) no opening, the system text running into the first user turn.
    system_after, user_after_system = between, ""
    if between.endswith(user_before):
        system_after, user_after_system = between[: len(between) - len(user_before)], None
    with_generation = render([user], generation=True)
    if not with_generation.startswith(one):
        raise ValueError("the generation prompt changes the conversation before it")
    pieces = ChatPieces(
        system=(system_before, system_after),
        user=(user_before, user_after),
        assistant=_split(two[len(one) :], ASSISTANT),
        default_system=opening[: len(opening) - len(user_before)],
        generation=with_generation[len(one) :],
        user_after_system=user_after_system,
    )
    for messages in _checks():  # the pieces must rebuild longer conversations exactly
        if pieces.render(messages) != render(messages, generation=True):
            raise ValueError("the template is not a plain sequence of per-message wrappers")
    return pieces


def _checks() -> list[list[dict]]:
    turns = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThanks."},
    ]
    return [turns, [{"role": "system", "content": "Be brief."}, *turns]]


def stop_words(tokenizer, pieces: ChatPieces | None) -> list[str]:
    """The end-of-turn token, and the special tokens the template writes around messages."""
    words = [tokenizer.eos_token] if tokenizer.eos_token else []
    if pieces is not None:
        text = "".join([*pieces.system, *pieces.user, *pieces.assistant, pieces.generation])
        special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        special |= set(tokenizer.all_special_tokens)
        words += sorted(t for t in special if t and t in text and t not in words)
    bos = tokenizer.bos_token
    return [w for w in words if w != bos]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text by itself: the GGUF then tells llama.cpp and
    Ollama to do the same (gguf's SpecialVocab reads it from the tokenizer)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def modelfile_text(base: Path, adapter: Path | None, tokenizer) -> tuple[str, str | None]:
    """(Modelfile text, why TEMPLATE was left out or None)."""
    lines = [f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    problem = None
    pieces = None
    if not getattr(tokenizer, "chat_template", None):
        problem = "the tokenizer has no chat template"
    else:
        try:
            pieces = chat_pieces(tokenizer)
        except Exception as error:  # any template error means: no Go template from it
            problem = f"its chat template could not be turned into Ollama's TEMPLATE ({error})"
    if pieces is not None:
        if adds_bos(tokenizer):
            pieces = pieces.without_bos(tokenizer.bos_token)
        template = pieces.go_template()
        if '"""' in template:
            pieces, problem = None, 'its chat template contains """, which a Modelfile cannot quote'
        else:
            lines.append(f'TEMPLATE """{template}"""')
    for word in stop_words(tokenizer, pieces):
        lines.append(f'PARAMETER stop "{word}"')
    return "\n".join(lines) + "\n", problem


def write_modelfile(path: Path, base: Path, adapter: Path | None, tokenizer) -> Path:
    text, problem = modelfile_text(base, adapter, tokenizer)
    if problem:
        import warnings

        warnings.warn(f"Modelfile without TEMPLATE: {problem}", stacklevel=2)
    write_text(path, text)
    return Path(path)
