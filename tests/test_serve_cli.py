"""`slimtune serve` as a user starts it, in-process: the command's run() builds the model,
engine and adapters, and its server is swapped for one on a free loopback port."""

from __future__ import annotations

import json

import httpx
import openai
from helpers import make_peft_adapter, make_tiny_llama, save_tiny_model, sums, write_jsonl

import slimtune.serve.server
from slimtune.cli import main


def test_serve_command_serves_adapters_and_loads_more(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "tiny")
    adapters = tmp_path / "adapters"
    make_peft_adapter(make_tiny_llama(), adapters / "a", seed=1)
    make_peft_adapter(make_tiny_llama(), adapters / "b", seed=2)
    seen = {}

    def serve_and_query(app, host, port):
        assert (host, port) == ("127.0.0.1", 8123)
        app.state.engine.start()  # what serve_forever runs on the main thread
        with slimtune.serve.server.BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
            seen["models"] = [m.id for m in client.models.list().data]
            added = httpx.post(f"{server.url}/v1/adapters", json={"name": "b"},
                               headers={"Authorization": "Bearer k"}, timeout=60)  # fmt: skip
            seen["added"] = added.status_code
            for name in ("tiny", "a", "b"):
                out = client.completions.create(
                    model=name, prompt="Hi", max_tokens=6, temperature=0
                )
                seen[name] = out.choices[0].text

    monkeypatch.setattr(slimtune.serve.server, "serve_forever", serve_and_query)
    argv = ["serve", "--model", str(model), "--adapter", f"a={adapters / 'a'}",
            "--adapter-dir", str(adapters), "--port", "8123", "--max-batch-size", "4",
            "--api-key", "k"]  # fmt: skip
    assert main(argv) == 0
    assert seen["models"] == ["tiny", "a"] and seen["added"] == 201
    assert len({seen["tiny"], seen["a"], seen["b"]}) == 3


def test_serve_command_rejects_bad_flags(tmp_path, capsys):
    assert main(["serve", "--adapter", f"x={tmp_path}"]) == 2  # before any model is loaded
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err


def test_serve_command_takes_a_chat_template(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "tiny")  # a tokenizer without a chat template
    seen = {}

    def serve_and_chat(app, host, port):
        seen["template"] = app.state.engine.tokenizer.chat_template
        app.state.engine.start()
        with slimtune.serve.server.BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
            seen["finish"] = out.choices[0].finish_reason

    monkeypatch.setattr(slimtune.serve.server, "serve_forever", serve_and_chat)
    assert main(["serve", "--model", str(model), "--chat-template", "chatml"]) == 0
    assert "<|im_start|>" in seen["template"] and seen["finish"] in ("stop", "length")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}")
    assert main(["serve", "--model", str(model), "--chat-template", str(bad)]) == 2
    assert "bad.jinja:1: not a valid Jinja template" in capsys.readouterr().err


def test_serve_qlora_holds_the_base_in_the_format_given(tmp_path, monkeypatch):
    """--qlora with the training config's --quant-type/--blocksize/--double-quant flags."""
    import slimtune.serve.build
    from slimtune.quant import Linear4bit

    model = save_tiny_model(tmp_path / "tiny")
    build, seen = slimtune.serve.build.build_engine, {}

    def spy(*args, **kwargs):
        engine, registry = build(*args, **kwargs)
        layers = [m for m in engine.model.modules() if isinstance(m, Linear4bit)]
        seen["formats"] = {(m.quant_type, m.blocksize, m.double_quant) for m in layers}
        return engine, registry

    monkeypatch.setattr(slimtune.serve.build, "build_engine", spy)
    monkeypatch.setattr(slimtune.serve.server, "serve_forever", lambda app, host, port: None)
    argv = ["serve", "--model", str(model), "--qlora", "--quant-type", "fp4", "--blocksize", "128",
            "--no-double-quant"]  # fmt: skip
    assert main(argv) == 0
    assert seen["formats"] == {("fp4", 128, False)}
    assert main(["serve", "--model", str(model), "--qlora"]) == 0
    assert seen["formats"] == {("nf4", 64, True)}  # QLoRA's recipe, `slimtune train`'s default


def test_serve_command_serves_dpo_and_sft_adapters_as_generate_runs_them(
    tmp_path, monkeypatch, capsys
):
    """Adapters from `slimtune train --objective dpo` and from plain SFT, served side by side:
    each answer (chat and raw) is the one `slimtune generate` gives with that adapter."""
    model = save_tiny_model(tmp_path / "tiny", initializer_range=0.3)
    rows = sums(12)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", rows)
    pairs = [dict(prompt=r["prompt"], chosen=r["completion"], rejected=r["completion"] + "0")
             for r in rows]  # fmt: skip
    dpo_data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = ["--model", str(model), "--method", "lora", "--max-steps", "3", "--lr", "0.02",
              "--rank", "4", "--no-progress", "--threads", "1"]  # fmt: skip
    for name, data, extra in (("sft", sft_data, []), ("dpo", dpo_data, ["--objective", "dpo"])):
        argv = ["train", *common, "--data", str(data), "--output", str(tmp_path / name), *extra]
        assert main(argv) == 0
    capsys.readouterr()

    def generated(adapter: str | None, raw: bool) -> str:
        argv = ["generate", "--model", str(model), "1+2=", "--max-new-tokens", "6", "--json"]
        argv += ["--adapter", str(tmp_path / adapter)] if adapter else []
        assert main(argv + (["--raw"] if raw else [])) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]

    expected = {(name, raw): generated(None if name == "tiny" else name, raw)
                for name in ("tiny", "sft", "dpo") for raw in (False, True)}  # fmt: skip
    served = {}

    def serve_and_query(app, host, port):
        app.state.engine.start()
        with slimtune.serve.server.BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
            for name in ("tiny", "sft", "dpo"):
                chat = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "1+2="}], max_tokens=6,
                    temperature=0,
                )  # fmt: skip
                raw = client.completions.create(
                    model=name, prompt="1+2=", max_tokens=6, temperature=0
                )
                served[name, False] = chat.choices[0].message.content
                served[name, True] = raw.choices[0].text

    monkeypatch.setattr(slimtune.serve.server, "serve_forever", serve_and_query)
    argv = ["serve", "--model", str(model), "--adapter", f"sft={tmp_path / 'sft'}",
            "--adapter", f"dpo={tmp_path / 'dpo'}"]  # fmt: skip
    assert main(argv) == 0
    assert served == expected
    # The adapters change the answers: the comparison above is not the base's twice.
    assert expected["dpo", True] != expected["tiny", True]
    assert expected["sft", True] != expected["tiny", True]


def test_serve_forever_runs_the_engine_on_the_calling_thread(tmp_path, monkeypatch):
    """The CLI's loop: uvicorn in a background thread, the engine on the thread that loaded the
    model, until stopped."""
    import socket
    import threading

    from slimtune.serve import create_app
    from slimtune.serve.build import build_engine

    engine, registry = build_engine(str(save_tiny_model(tmp_path / "tiny")), start=False)
    app = create_app(engine, registry)
    seen = {}
    real_loop = engine._loop

    def loop():
        seen["thread"] = threading.current_thread()
        url = f"http://127.0.0.1:{port}"

        def ask():
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3}
            seen["status"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code
            engine.stop()

        threading.Thread(target=ask).start()
        real_loop()

    monkeypatch.setattr(engine, "_loop", loop)
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slimtune.serve.server.serve_forever(app, "127.0.0.1", port)
    assert seen == {"thread": threading.main_thread(), "status": 200}


def test_engine_on_own_thread_loads_and_computes_on_one_thread(tmp_path, monkeypatch):
    """The UI's playground engine: the thread that loads the model runs the loop."""
    import threading

    from helpers import generation_request

    import slimtune.serve.build as build

    threads = {}
    load = build.load_model

    def spy_load(*args, **kwargs):
        threads["load"] = threading.current_thread()
        return load(*args, **kwargs)

    monkeypatch.setattr(build, "load_model", spy_load)
    engine, _ = build.engine_on_own_thread(str(save_tiny_model(tmp_path / "tiny")))
    prefill = engine._batch.prefill

    def spy_prefill(*args):
        threads["compute"] = threading.current_thread()
        return prefill(*args)

    engine._batch.prefill = spy_prefill
    finish = engine.submit(generation_request(engine.tokenizer, "Hi", None)).result(60)
    engine.stop()
    assert finish.reason in ("stop", "length")
    assert threads["load"] is threads["compute"] is not threading.main_thread()


def test_serve_device_flag_places_the_model_or_says_why_not(tmp_path, monkeypatch, capsys):
    """--device cpu serves from the CPU; --device cuda where torch sees no GPU stops before
    any model is loaded, with a message naming the device."""
    import torch
    from helpers import generation_request

    import slimtune.serve.build
    from slimtune.devices import device_of

    model = save_tiny_model(tmp_path / "tiny")
    build, seen = slimtune.serve.build.build_engine, {}

    def spy(*args, **kwargs):
        engine, registry = build(*args, **kwargs)
        seen["asked"], seen["placed"] = kwargs["device"], device_of(engine.model)
        return engine, registry

    def serve_and_generate(app, host, port):
        engine = app.state.engine.start()
        request = generation_request(engine.tokenizer, "Hi", None, max_tokens=3)
        seen["finish"] = engine.submit(request).result(60).reason

    monkeypatch.setattr(slimtune.serve.build, "build_engine", spy)
    monkeypatch.setattr(slimtune.serve.server, "serve_forever", serve_and_generate)
    assert main(["serve", "--model", str(model), "--device", "cpu"]) == 0
    cpu = torch.device("cpu")
    assert seen["asked"] == seen["placed"] == cpu and seen["finish"] in ("stop", "length")

    seen.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--model", str(model), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "serve: error:" in err and "cuda" in err and not seen  # refused before loading
    assert main(["serve", "--model", str(model)]) == 0  # auto: the CPU when there is no GPU
    assert seen["asked"] == cpu
