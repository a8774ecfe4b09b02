"""The OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import make_char_tokenizer, make_peft_adapter, make_tiny_llama

from slimtune.serve import AdapterRegistry, Engine, GenerationRequest, create_app
from slimtune.serve.server import BackgroundServer

BASE = "tiny-llama"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = make_tiny_llama()
    for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
        make_peft_adapter(model, root / "adapters" / name, seed)
    make_peft_adapter(model, root / "outside", 4)
    (root / "adapters" / "sneaky").symlink_to(root / "outside")
    return root / "adapters"


@pytest.fixture(scope="module")
def server(adapter_dir):
    tokenizer = make_char_tokenizer()
    engine = Engine(make_tiny_llama(), tokenizer, max_batch_size=8).start()
    registry = AdapterRegistry(BASE, adapter_dir)
    for name in ("a", "b"):
        engine.load_adapter(name, adapter_dir / name).result(timeout=60)
        registry.paths[name] = adapter_dir / name
    with BackgroundServer(create_app(engine, registry, api_key=KEY)) as background:
        background.engine = engine
        yield background
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _direct(server, prompt_ids, adapter, max_tokens=8):
    """What the engine gives for the same prompt without HTTP in between."""
    request = GenerationRequest(prompt_ids, adapter, max_tokens=max_tokens)
    return server.engine.submit(request).result(120).text


def test_model_list_has_the_base_and_the_adapters(client):
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]
    assert client.models.retrieve("a").id == "a"


def test_completions_for_base_and_two_adapters(server, client):
    ids = server.engine.tokenizer("Hello there")["input_ids"]
    texts = {}
    for model, adapter in [(BASE, None), ("a", "a"), ("b", "b")]:
        out = client.completions.create(
            model=model, prompt="Hello there", max_tokens=8, temperature=0
        )
        assert out.model == model and out.choices[0].finish_reason in ("length", "stop")
        assert out.usage.prompt_tokens == len(ids)
        assert out.choices[0].text == _direct(server, ids, adapter)
        texts[model] = out.choices[0].text
    assert len(set(texts.values())) == 3  # each adapter really changes the output


def test_chat_for_base_and_two_adapters(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = server.engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = server.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for model, adapter in [(BASE, None), ("a", "a"), ("b", "b")]:
        out = client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0
        )
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == _direct(server, ids, adapter, 6)
        assert out.usage.prompt_tokens == len(ids)


def test_streaming_gives_the_same_text_as_one_response(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(
        model="a", messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="a", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    plain = client.completions.create(model="b", prompt="Once", max_tokens=7, temperature=0)
    streamed = client.completions.create(
        model="b", prompt="Once", max_tokens=7, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_concurrent_requests_for_different_adapters_match_sequential(client):
    jobs = [(m, f"prompt {i}") for i, m in enumerate([BASE, "a", "b", "a", "b", BASE, "a", "b"])]

    def ask(job):
        model, prompt = job
        out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        return out.choices[0].text

    sequential = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(ask, jobs)) == sequential


def _error(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert _error(e)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", max_tokens=-1)
    assert _error(e)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "x"}], temperature=2.5
        )
    assert _error(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x" * 300, max_tokens=4)
    assert _error(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=[], max_tokens=2)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=headers)
    assert (
        response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    )

    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401

    out = client.completions.create(model="a", prompt="still here", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def _adapters(server, method, path="", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.request(
        method, f"{server.url}/v1/adapters{path}", headers=headers, timeout=60, **kwargs
    )


def test_adapters_load_and_unload_at_run_time(server, client):
    loaded = _adapters(server, "POST", json={"name": "c"})
    assert loaded.status_code == 201, loaded.text
    assert "c" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="c", prompt="Hi", max_tokens=5, temperature=0)
    a_text = client.completions.create(model="a", prompt="Hi", max_tokens=5, temperature=0)
    assert text.choices[0].text != a_text.choices[0].text
    assert _adapters(server, "POST", json={"name": "c"}).status_code == 409

    assert _adapters(server, "DELETE", "/c").json()["deleted"] is True
    assert "c" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="Hi", max_tokens=2)
    assert _adapters(server, "DELETE", "/c").status_code == 404


@pytest.mark.parametrize(
    "body, status",
    [
        ({"name": "../a"}, 400),
        ({"name": "x", "path": "../outside"}, 403),
        ({"name": "x", "path": "sneaky"}, 403),  # a symlink inside pointing outside
        ({"name": "x", "path": "/etc"}, 403),
        ({"name": "x", "path": "missing"}, 400),
        ({"name": BASE, "path": "c"}, 400),
        ({"path": "c"}, 400),
    ],
)
def test_adapter_paths_cannot_escape_the_adapter_dir(server, body, status):
    response = _adapters(server, "POST", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_full_queue_answers_503():
    from fastapi.testclient import TestClient

    engine = Engine(make_tiny_llama(), make_char_tokenizer(), max_queue=0)  # never accepts
    app = create_app(engine, AdapterRegistry(BASE))
    response = TestClient(app).post("/v1/completions", json={"model": BASE, "prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_full"


def test_a_whole_answer_wakes_the_event_loop_once_a_stream_every_token():
    from slimtune.serve.app import _forward
    from slimtune.serve.engine import Delta, Finish

    async def queued(stream: bool) -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        on_event = _forward(asyncio.get_running_loop(), queue, stream)
        for event in [Delta("a", 1), Delta("b", 2), Finish("length", "ab", 1, 2)]:
            on_event(event)  # as the engine thread calls it
        await asyncio.sleep(0)
        return [type(queue.get_nowait()).__name__ for _ in range(queue.qsize())]

    assert asyncio.run(queued(False)) == ["Finish"]
    assert asyncio.run(queued(True)) == ["Delta", "Delta", "Finish"]
