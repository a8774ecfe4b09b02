"""Chat templates for models that ship none (base models such as Gemma 3 270M): a few well-known
ones built in, or any Jinja file, set on the tokenizer; and the one saved with an adapter.

A template is saved with the adapter the way transformers saves a tokenizer's
(`chat_template.jinja` in the adapter folder), so evaluation and generation on that adapter
render prompts exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import SlimtuneError

TEMPLATE_FILE = "chat_template.jinja"  # transformers' file name for a tokenizer's template

# Each renders a conversation's beginning as a prefix of the whole (slimtune masks prompts by
# rendering prefixes), and closes every turn with its model's end-of-turn marker.
BUILTIN = {
    # Qwen, SmolLM2, many others: <|im_start|>role ... <|im_end|>
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 / 3.2 instruct, without the tool-calling parts
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # Gemma 2 / 3: a system message goes before the first user turn; the assistant is 'model'
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set prefix = messages[0]['content'] | trim + '\n\n' %}"
        "{% set turns = messages[1:] %}"
        "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str | Path) -> str:
    """The Jinja text of a built-in template name, or of a template file."""
    if isinstance(value, str) and value in BUILTIN:
        return BUILTIN[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise SlimtuneError(
            f"chat template {str(value)!r} is neither a built-in template "
            f"({', '.join(BUILTIN)}) nor a Jinja file"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SlimtuneError(f"cannot read chat template {path}: {error}") from None
    _check_jinja(text, str(path))
    return text


def set_chat_template(tokenizer, value: str | Path | None):
    """Give `tokenizer` the template `value` (a built-in name or a file); None leaves its own."""
    if value is not None:
        tokenizer.chat_template = resolve_chat_template(value)
    return tokenizer


def saved_chat_template(folder: str | Path) -> str | None:
    """The template saved in an adapter (or model) folder, if any."""
    path = Path(folder) / TEMPLATE_FILE
    return path.read_text() if path.is_file() else None


def _check_jinja(text: str, where: str) -> None:
    """A syntax error now, naming the file and line, rather than at the first rendered row."""
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise SlimtuneError(
            f"{where}:{error.lineno}: not a valid Jinja template: {error}"
        ) from None
