"""The playground: one prompt answered by the base model and by adapters, side by side.

Generation goes through `slimtune serve`'s engine, so the answers here are the answers the
server gives: the requests for the base and every adapter are submitted together and the engine
runs them in one mixed batch. One engine (one base model) is held at a time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError


class Playground:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str | None, bool] | None = None
        self._engine = None
        self._names: dict[Path, str] = {}  # adapter folder -> its name in the engine

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        self._engine, self._key, self._names = None, None, {}

    def engine(self, model: str | None, qlora: bool):
        """The engine for this base model, built on first use (replacing another one)."""
        # Imported on first use: the UI starts without loading the model stack (transformers).
        from slimtune.serve.build import engine_on_own_thread

        key = (model, qlora)
        with self._lock:
            if self._key != key:
                self._drop()
                # Loaded and run by one thread: a second thread's OpenMP pool would slow it.
                self._engine, _ = engine_on_own_thread(model, qlora=qlora, max_batch_size=8)
                self._key = key
            return self._engine

    def adapter_name(self, engine, folder: Path) -> str:
        with self._lock:
            if folder not in self._names:
                name = f"adapter-{len(self._names) + 1}"
                engine.load_adapter(name, folder).result()
                self._names[folder] = name
            return self._names[folder]

    def answer(
        self,
        *,
        model: str | None,
        qlora: bool,
        adapters: list[Path],
        messages: list[dict[str, str]],
        include_base: bool = True,
        max_tokens: int = 64,
        temperature: float = 0.0,
    ) -> list[dict[str, Any]]:
        """One answer per column: the base (if asked) and each adapter, in that order."""
        from slimtune.serve import GenerationRequest  # on first use, as build_engine above

        if not messages or not any(m.get("content", "").strip() for m in messages):
            raise SlimtuneError("the prompt is empty")
        engine = self.engine(model, qlora)
        columns: list[tuple[str, str | None]] = [("base", None)] if include_base else []
        for folder in adapters:
            if not (folder / "adapter_config.json").is_file():
                raise SlimtuneError(f"{folder}: no adapter (the run has not finished)")
            columns.append((folder.name, self.adapter_name(engine, folder)))
        if not columns:
            raise SlimtuneError("choose the base model or at least one adapter")
        ids = _encode(engine.tokenizer, messages)
        room = engine.max_context - len(ids)
        if room < 1:
            raise SlimtuneError(
                f"the prompt has {len(ids)} tokens; the context is {room + len(ids)}"
            )
        t0 = time.perf_counter()
        requests = [
            engine.submit(
                GenerationRequest(list(ids), adapter, min(max_tokens, room), temperature, seed=0)
            )
            for _, adapter in columns
        ]
        out = []
        for (label, _), request in zip(columns, requests, strict=True):
            finish = request.result(timeout=600)
            if finish.reason == "error":
                raise SlimtuneError(f"{label}: generation failed: {finish.error}")
            out.append(
                {
                    "label": label,
                    "text": finish.text,
                    "tokens": finish.completion_tokens,
                    "finish": finish.reason,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
        return out


def _encode(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template where the model has one (as /v1/chat/completions), else plain text
    (as /v1/completions): the turns joined by newlines."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
