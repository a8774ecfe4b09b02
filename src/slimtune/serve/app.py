"""The HTTP layer: OpenAI's routes on FastAPI, handing every generation to the Engine."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimtune.errors import SlimtuneError
from slimtune.serve import protocol as p
from slimtune.serve.adapters import AdapterError, AdapterRegistry
from slimtune.serve.engine import Delta, Engine, Finish, GenerationRequest, QueueFull


class ApiError(Exception):
    """Answered as an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


def create_app(engine: Engine, registry: AdapterRegistry, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="slimtune", docs_url=None, redoc_url=None)
    app.state.engine, app.state.registry = engine, registry
    adapter_lock = asyncio.Lock()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           code="invalid_api_key")  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError):
        body = p.error_body(str(error), error.type, error.param, error.code)
        return JSONResponse(body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, loc = "the request body is not valid JSON", []
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        body = p.error_body(message, "invalid_request_error", ".".join(loc) or None)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, error: StarletteHTTPException):
        body = p.error_body(str(error.detail), "invalid_request_error")
        return JSONResponse(body, status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queued}

    guarded = [Depends(authorize)]

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        cards = [p.model_card(registry.base_name, "slimtune")]
        cards += [p.model_card(name, "slimtune-adapter") for name in registry.names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name}", dependencies=guarded)
    async def model(name: str) -> dict:
        _adapter_for(registry, name)
        owner = "slimtune" if name == registry.base_name else "slimtune-adapter"
        return p.model_card(name, owner)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: p.CompletionRequest):
        adapter = _adapter_for(registry, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes a single prompt", param="prompt")
        encoded = [_encode(engine, text, special=True) for text in prompts]
        requests = [_request(engine, body, ids, body.max_tokens, adapter) for ids in encoded]
        if body.stream:
            _submit(engine, requests, stream=True)  # before the 200: a full queue is a 503
            return _sse(_stream_completion(body, requests[0]))
        finishes = await asyncio.gather(*(_run(engine, r) for r in _submit(engine, requests)))
        choices = [
            {"index": i, "text": f.text, "logprobs": None, "finish_reason": f.reason}
            for i, f in enumerate(finishes)
        ]
        return {
            "id": p.new_id("cmpl"),
            "object": "text_completion",
            "created": p.now(),
            "model": body.model,
            "choices": choices,
            "usage": p.usage(
                sum(f.prompt_tokens for f in finishes), sum(f.completion_tokens for f in finishes)
            ),
        }

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: p.ChatRequest):
        adapter = _adapter_for(registry, body.model)
        ids = _encode(engine, _chat_prompt(engine, body), special=False)
        request = _request(engine, body, ids, body.max_completion_tokens or body.max_tokens,
                           adapter)  # fmt: skip
        if body.stream:
            _submit(engine, [request], stream=True)
            return _sse(_stream_chat(body, request))
        (finish,) = [await _run(engine, r) for r in _submit(engine, [request])]
        return {
            "id": p.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": p.now(),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": finish.text},
                    "logprobs": None,
                    "finish_reason": finish.reason,
                }
            ],
            "usage": p.usage(finish.prompt_tokens, finish.completion_tokens),
        }

    @app.post("/v1/adapters", dependencies=guarded, status_code=201)
    async def load_adapter(body: p.AdapterLoad) -> dict:
        async with adapter_lock:
            path = _adapter_call(lambda: registry.check_new(body.name, body.path))
            try:
                await asyncio.wrap_future(engine.load_adapter(body.name, path))
            except (SlimtuneError, ValueError, KeyError, OSError) as error:
                raise ApiError(
                    400, f"cannot load adapter {body.name!r}: {error}", param="path"
                ) from None
            registry.paths[body.name] = path
        return p.model_card(body.name, "slimtune-adapter")

    @app.delete("/v1/adapters/{name}", dependencies=guarded)
    async def unload_adapter(name: str) -> dict:
        async with adapter_lock:
            if name not in registry.paths:
                raise ApiError(404, f"adapter {name!r} is not loaded", param="name",
                               code="model_not_found")  # fmt: skip
            del registry.paths[name]
            engine.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def _adapter_call(fn):
    try:
        return fn()
    except AdapterError as error:
        raise ApiError(error.status, str(error), param=error.param) from None


def _adapter_for(registry: AdapterRegistry, model: str) -> str | None:
    try:
        return registry.lookup(model)
    except KeyError:
        raise ApiError(404, f"the model {model!r} does not exist", param="model",
                       code="model_not_found") from None  # fmt: skip


def _chat_prompt(engine: Engine, body: p.ChatRequest) -> str:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions")
    messages = [m.as_template_input() for m in body.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(engine: Engine, text: str, *, special: bool) -> list[int]:
    ids = engine.tokenizer(text, add_special_tokens=special)["input_ids"]
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return list(ids)


def _request(engine: Engine, body, ids: list[int], max_tokens: int | None, adapter):
    room = engine.max_context - len(ids)
    wanted = max_tokens if max_tokens is not None else room
    if wanted > room or room < 1:
        raise ApiError(
            400,
            f"this model's context is {engine.max_context} tokens; the prompt has {len(ids)} "
            f"and {wanted} more were asked for",
            param="max_tokens" if room >= 1 else "prompt",
            code="context_length_exceeded",
        )
    return GenerationRequest(
        ids, adapter, wanted, body.temperature, body.top_p, body.stops(), body.seed,
        ignore_eos=body.ignore_eos,
    )  # fmt: skip


def _submit(
    engine: Engine, requests: list[GenerationRequest], stream: bool = False
) -> list[GenerationRequest]:
    """Queue all requests or none; each gets an asyncio queue of its events (of its finish
    alone unless `stream`: a new token need not wake the event loop of a whole answer)."""
    loop = asyncio.get_running_loop()
    for request in requests:
        events: asyncio.Queue = asyncio.Queue()
        request.on_event = _forward(loop, events, stream)
        request.events = events
    for i, request in enumerate(requests):
        try:
            engine.submit(request)
        except QueueFull as error:
            for queued in requests[:i]:
                queued.cancel()
            raise ApiError(503, f"the server is busy: {error}", "server_busy",
                           code="queue_full") from None  # fmt: skip
    return requests


def _forward(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, stream: bool):
    def on_event(event: Delta | Finish) -> None:
        if stream or isinstance(event, Finish):
            loop.call_soon_threadsafe(events.put_nowait, event)

    return on_event


async def _events(request: GenerationRequest) -> AsyncIterator[Delta | Finish]:
    try:
        while True:
            event = await request.events.get()
            yield event
            if isinstance(event, Finish):
                return
    finally:
        if request._finish is None:
            request.cancel()  # the client went away: free its batch slot


async def _run(engine: Engine, request: GenerationRequest) -> Finish:
    async for event in _events(request):
        if isinstance(event, Finish):
            _raise_failed(event)
            return event
    raise AssertionError("unreachable")


def _raise_failed(finish: Finish) -> None:
    if finish.reason == "error":
        raise ApiError(500, f"generation failed: {finish.error}", "server_error")
    if finish.reason == "cancelled":
        raise ApiError(503, "the server is shutting down", "server_busy")


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _stream_completion(body, request) -> AsyncIterator[dict]:
    head = {"id": p.new_id("cmpl"), "object": "text_completion", "created": p.now(),
            "model": body.model}  # fmt: skip
    async for event in _events(request):
        if isinstance(event, Delta):
            choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": event.reason}
        yield {**head, "choices": [choice]}
        if isinstance(event, Finish) and body.include_usage():
            yield {**head, "choices": [], "usage": _usage(event)}


async def _stream_chat(body, request) -> AsyncIterator[dict]:
    head = {"id": p.new_id("chatcmpl"), "object": "chat.completion.chunk", "created": p.now(),
            "model": body.model}  # fmt: skip
    first = {"role": "assistant", "content": ""}
    yield {**head, "choices": [{"index": 0, "delta": first, "finish_reason": None}]}
    async for event in _events(request):
        if isinstance(event, Delta):
            choice = {"index": 0, "delta": {"content": event.text}, "finish_reason": None}
        else:
            choice = {"index": 0, "delta": {}, "finish_reason": event.reason}
        yield {**head, "choices": [choice]}
        if isinstance(event, Finish) and body.include_usage():
            yield {**head, "choices": [], "usage": _usage(event)}


def _usage(finish: Finish) -> dict:
    return p.usage(finish.prompt_tokens, finish.completion_tokens)
