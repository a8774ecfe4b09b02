"""`slimtune serve` as a user starts it: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from conftest import make_tiny_llama
from test_serve_support import make_peft_adapter, save_tiny_model

import slimtune


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("serve did not come up")


def test_serve_command_serves_adapters_and_loads_more(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    adapters = tmp_path / "adapters"
    make_peft_adapter(make_tiny_llama(), adapters / "a", seed=1)
    make_peft_adapter(make_tiny_llama(), adapters / "b", seed=2)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(slimtune.__file__).parents[1]))
    argv = [sys.executable, "-m", "slimtune", "serve", "--model", str(model),
            "--adapter", f"a={adapters / 'a'}", "--adapter-dir", str(adapters),
            "--port", str(port), "--max-batch-size", "4", "--api-key", "k"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny", "a"]
        added = httpx.post(f"{url}/v1/adapters", json={"name": "b"},
                           headers={"Authorization": "Bearer k"}, timeout=60)  # fmt: skip
        assert added.status_code == 201
        texts = {
            name: client.completions.create(model=name, prompt="Hi", max_tokens=6, temperature=0)
            .choices[0]
            .text
            for name in ("tiny", "a", "b")
        }
        assert len(set(texts.values())) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_command_rejects_a_missing_adapter(tmp_path, capsys):
    from slimtune.cli import main

    assert main(["serve", "--adapter", f"x={tmp_path}"]) == 2  # before any model is loaded
    assert "adapter_config.json" in capsys.readouterr().err
