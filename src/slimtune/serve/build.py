"""Put a server together: load the base model (float or 4-bit), start the engine, load adapters."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.infer import decoded_weights, inference_context
from slimtune.models import load_model
from slimtune.models.chat_templates import set_chat_template
from slimtune.quant import QuantConfig
from slimtune.serve.adapters import AdapterRegistry, check_name
from slimtune.serve.engine import Engine

DEFAULT_NAME = "SmolLM2-135M-Instruct"


def base_model_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def build_engine(
    model: str | None,
    *,
    qlora: bool | QuantConfig = False,
    adapters: list[tuple[str, Path]] = (),
    adapter_dir: Path | None = None,
    base_name: str | None = None,
    four_bit: bool = True,
    compute_dtype=None,
    chat_template: str | Path | None = None,
    device: str | torch.device = "cpu",
    start: bool = True,
    **engine_options,
) -> tuple[Engine, AdapterRegistry]:
    """An Engine with `adapters` loaded, and the registry of the names clients use. `start`:
    its loop runs in a background thread; else the caller runs it (`Engine.run()`).

    A 4-bit base (`qlora`: True for QLoRA's NF4, or its QuantConfig; or a 4-bit model folder)
    computes from its packed codes for the engine's life (`slimtune.quant.inference`);
    `four_bit=False` decodes float copies instead. `chat_template` (a built-in name or a Jinja
    file) replaces the model's own for chat requests. `device`: where the model runs (adapters
    loaded later join it there)."""
    quant = None
    if qlora:
        quant = qlora if isinstance(qlora, QuantConfig) else QuantConfig()
        if compute_dtype is not None:
            quant = dataclasses.replace(quant, compute_dtype=compute_dtype)
    network, tokenizer = load_model(model, quant=quant)
    set_chat_template(tokenizer, chat_template)  # before anything starts: a bad file fails here
    # Loaded on the CPU (4-bit layers as codes); moved before the inference context sets the
    # 4-bit layers up, so that their kernels read the moved buffers.
    network.to(device)
    stack = contextlib.ExitStack()
    if four_bit:
        stack.enter_context(inference_context(network, True, compute_dtype))
    else:
        stack.enter_context(decoded_weights(network))
    registry = AdapterRegistry(base_name or base_model_name(model), adapter_dir)
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise SlimtuneError(f"--adapter-dir {adapter_dir} is not a folder")
    engine = Engine(network, tokenizer, **engine_options)
    engine.on_stop.append(stack.close)
    if start:
        engine.start()
    try:
        for name, path in adapters:
            check_name(name, registry.base_name)
            if name in registry.paths:
                raise SlimtuneError(f"--adapter {name}: the name is given twice")
            engine.load_adapter(name, path).result()
            registry.paths[name] = Path(path).resolve()
    except BaseException:
        engine.stop()
        raise
    return engine, registry


def engine_on_own_thread(model: str | None, **options) -> tuple[Engine, AdapterRegistry]:
    """`build_engine(model, **options)` on a new thread, which then runs the engine's loop: the
    thread that loads the model is the one that computes with it (see `Engine.run`). Returns
    once the engine is built; `engine.stop()` ends the thread."""
    built: concurrent.futures.Future = concurrent.futures.Future()

    def own() -> None:
        try:
            engine, registry = build_engine(model, start=False, **options)
        except BaseException as error:  # handed to the caller
            built.set_exception(error)
            return
        built.set_result((engine, registry))
        engine.run()

    threading.Thread(target=own, name="slimtune-engine", daemon=True).start()
    return built.result()
