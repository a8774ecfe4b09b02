"""An Ollama Modelfile for an exported GGUF: FROM, ADAPTER, TEMPLATE and stop parameters.

Ollama's TEMPLATE is a Go template, not the Jinja chat template the tokenizer carries. The Go
template is derived by rendering the Jinja template on marker messages and cutting out what it
puts around each role's content (and any default system turn it adds), then checked: the pieces
must rebuild the Jinja rendering of longer conversations exactly. A template that is not a
sequence of per-message wrappers fails the check and the Modelfile is written without TEMPLATE
(Ollama then falls back to the chat template inside the GGUF); the caller is told why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune.files import write_text

SYS, USER, ASSISTANT = "SLIMTUNE_SYSTEM_MARK", "SLIMTUNE_USER_MARK", "SLIMTUNE_ASSISTANT_MARK"


@dataclass
class ChatPieces:
    """What a chat template puts around each message (before, after), the default system turn
    it adds when the conversation has none, and the generation prompt."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    default_system: str
    generation: str

    def render(self, messages: list[dict]) -> str:
        """The prompt these pieces give, with the generation prompt (as Ollama renders it)."""
        text = "" if messages and messages[0]["role"] == "system" else self.default_system
        for message in messages:
            before, after = getattr(self, message["role"])
            text += before + message["content"] + after
        return text + self.generation

    def go_template(self) -> str:
        """The same as an Ollama (Go) template, written without whitespace-trimming markers
        so that the literal pieces keep every newline."""

        def wrap(role: str) -> str:
            before, after = getattr(self, role)
            return (
                f'{{{{ if eq $m.Role "{role}" }}}}{before}{{{{ $m.Content }}}}{after}{{{{ end }}}}'
            )

        return (
            "{{ range $i, $m := .Messages }}"
            f'{{{{ if and (eq $i 0) (ne $m.Role "system") }}}}{self.default_system}{{{{ end }}}}'
            + wrap("system") + wrap("user") + wrap("assistant")
            + "{{ end }}" + self.generation
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

    sys_msg = {"role": "system", "content": SYS}
    user_msg = {"role": "user", "content": USER}
    assistant_msg = {"role": "assistant", "content": ASSISTANT}
    only_system = render([sys_msg])
    system_user = render([sys_msg, user_msg])
    system_user_assistant = render([sys_msg, user_msg, assistant_msg])
    for longer, shorter in [(system_user, only_system), (system_user_assistant, system_user)]:
        if not longer.startswith(shorter):
            raise ValueError("a later message changes what the template wrote for earlier ones")
    user_turn = system_user[len(only_system) :]
    only_user = render([user_msg])
    if not only_user.endswith(user_turn):
        raise ValueError("the first user turn is written differently without a system message")
    pieces = ChatPieces(
        system=_split(only_system, SYS),
        user=_split(user_turn, USER),
        assistant=_split(system_user_assistant[len(system_user) :], ASSISTANT),
        default_system=only_user[: len(only_user) - len(user_turn)],
        generation=render([sys_msg, user_msg], generation=True)[len(system_user) :],
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
