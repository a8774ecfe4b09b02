"""The batching engine: one thread owns the model; requests join and leave the batch every step.

Continuous batching: between two decode steps the engine admits waiting requests (one prefill
pass for all of them, left-padded), appends their KV cache rows to the running batch and drops
the rows that finished. Every forward pass runs under `per_sample_adapters`, so one batch mixes
requests for different adapters (and the base) without merging anything.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slimtune.devices import device_of
from slimtune.infer import eos_ids
from slimtune.lora import delete_adapter, load_adapter, lora_layers, per_sample_adapters
from slimtune.serve.batch import new_batch
from slimtune.serve.sampling import next_tokens
from slimtune.serve.text import TextStream
from slimtune.tokens import pad_token_id

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (`max_queue`)."""


@dataclass
class Delta:
    """New text of one request (may be empty while a multi-byte character is incomplete)."""

    text: str
    token_id: int


@dataclass
class Finish:
    """The end of one request: why it ended, its whole text and its token counts."""

    reason: str  # "stop" | "length" | "error" | "cancelled"
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)


Event = Delta | Finish


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model alone
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens tokens whatever comes (benchmarks)
    on_event: Callable[[Event], None] | None = None  # called on the engine thread
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _finish: Finish | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Finish:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        assert self._finish is not None
        return self._finish


class _Row:
    """One running request: its generated tokens, text and sampling state."""

    def __init__(self, request: GenerationRequest, stream: TextStream):
        self.request = request
        self.stream = stream
        self.ids: list[int] = []
        self.last_token = -1
        self.finish_reason: str | None = None
        self.generator = None
        if request.temperature > 0 and request.seed is not None:
            self.generator = torch.Generator().manual_seed(request.seed)


class Engine:
    """Runs generation for many concurrent requests on one model in one background thread."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        mixed_batches: bool = True,
        batch_wait_s: float = 0.003,
        max_context: int | None = None,
        lean: bool = True,
    ):
        self.model = model.eval()
        self.device = device_of(model)  # where inputs built from token lists go
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        # False: one adapter per batch (the baseline that mixed batching is measured against).
        self.mixed_batches = mixed_batches
        self.batch_wait_s = batch_wait_s
        self.max_context = max_context or _context_length(model)
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer)  # masked out: the same rule as training
        self.adapters: set[str] = set()  # loaded into the model (touched on the engine thread)
        self._lora_layers = self._find_lora_layers()
        self.steps = 0  # forward passes run, for tests and benchmarks
        # passes by kind, and their seconds (the forward, sampling and text)
        self.pass_counts = {"prefill": 0, "decode": 0}
        self.pass_seconds = {"prefill": 0.0, "decode": 0.0}
        self._pending: list[GenerationRequest] = []
        self._controls: list[Callable[[], None]] = []
        self._unloading: set[str] = set()
        self._rows: list[_Row] = []
        # lean: slimtune's own forward where it covers the model (False: transformers' always).
        self._batch = new_batch(self.model, self.max_context, lean)
        self._cond = threading.Condition()
        self._stopping = False
        self._running = False  # the loop runs (on its own thread, or on run()'s)
        self._thread: threading.Thread | None = None
        self.on_stop: list[Callable[[], object]] = []  # run once the engine thread has ended

    # -- public API (any thread) -------------------------------------------------------------

    def start(self) -> Engine:
        """Run the loop in a background thread (`stop()` ends it)."""
        self._thread = threading.Thread(target=self._loop, name="slimtune-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until `stop()` is called from another one.

        Use the thread that loaded the model: OpenMP keeps a pool of threads for every thread
        that runs parallel work, and once there are more pooled threads than cores, idle ones
        stop spinning and every small parallel op waits for a sleeping thread to wake (a
        decode step of 16 rows took 6x as long on a second thread)."""
        try:
            self._loop()
        finally:
            self._run_on_stop()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._run_on_stop()

    def _run_on_stop(self) -> None:
        while self.on_stop:
            self.on_stop.pop()()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a request; raises QueueFull when `max_queue` requests already wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the engine is stopping")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max-queue)")
            self._pending.append(request)
            self._cond.notify_all()
        return request

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps (e.g. load an adapter)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def control() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # handed to the caller, not raised here
                    future.set_exception(error)

        with self._cond:
            running = self._running
            if running:
                self._controls.append(control)
                self._cond.notify_all()
        if not running:  # before the loop starts: this thread owns the model
            control()
        return future

    def load_adapter(self, name: str, path) -> concurrent.futures.Future:
        def load() -> None:
            load_adapter(self.model, str(path), adapter_name=name)
            self.model.eval()
            self.adapters.add(name)
            self._adapters_changed()

        return self.call(load)

    def unload_adapter(self, name: str) -> None:
        """Delete the adapter from the model once no running or waiting request uses it."""
        with self._cond:
            self._unloading.add(name)
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        # The model, tokenizer and server live as long as the loop runs: out of the collector's
        # reach, full collections stop walking them every few hundred steps. Given back after,
        # so that a process starting engines again (tests, the web UI) can still free them.
        gc.freeze()
        with self._cond:
            self._running = True
        try:
            self._steps()
        finally:
            with self._cond:
                self._running = False
            gc.unfreeze()

    def _steps(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._stopping
                    or self._pending
                    or self._controls
                    or self._rows
                    or self._unloading
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                controls, self._controls = self._controls, []
            self._unload_unused()
            for control in controls:
                control()
            if not self._rows and self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # let requests sent together meet in one prefill
            admitted: list[GenerationRequest] = []
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                elif self._rows:
                    self._decode()
            except Exception as error:  # a failed forward pass must not take the server down
                log.exception("generation failed")
                for row in self._rows:
                    self._finish(row, "error", error=f"{type(error).__name__}: {error}")
                for request in admitted:
                    if request._finish is None:
                        self._finish(_Row(request, self._stream()), "error", error=str(error))
                self._rows = []
                self._batch.keep_rows([])
        with self._cond:
            waiting, self._pending = self._pending, []
        for row in self._rows + [_Row(r, self._stream()) for r in waiting]:
            self._finish(row, "cancelled")

    def _admit(self) -> list[GenerationRequest]:
        with self._cond:
            for request in self._pending:
                if request.cancelled:
                    self._finish(_Row(request, self._stream()), "cancelled")
                elif request.adapter is not None and request.adapter not in self.adapters:
                    # Unloaded between the HTTP layer's check and now: fail this request only.
                    message = f"adapter {request.adapter!r} is not loaded"
                    self._finish(_Row(request, self._stream()), "error", error=message)
            self._pending = [r for r in self._pending if r._finish is None]
            room = self.max_batch_size - len(self._rows)
            if room <= 0 or not self._pending:
                return []
            if self.mixed_batches:
                taken = self._pending[:room]
            else:
                group = self._rows[0].request.adapter if self._rows else self._pending[0].adapter
                if self._pending[0].adapter != group:
                    return []  # first drain this adapter's batch: the oldest request waits
                taken = [r for r in self._pending if r.adapter == group][:room]
            self._pending = [r for r in self._pending if all(r is not t for t in taken)]
            return taken

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        start = time.perf_counter()
        # Ordered by adapter, each adapter's rows are one slice of the batch (lora/stacked.py).
        requests = sorted(requests, key=lambda r: (r.adapter is not None, r.adapter or ""))
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        # Filled on the CPU, then moved in one copy each (nothing moves when the model is there).
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            logits = self._batch.prefill(ids, mask, [r.adapter for r in requests], self._adapters)
        self._count("prefill")
        first = len(self._rows)
        self._rows += [_Row(r, self._stream(r.stop)) for r in requests]
        self._advance(logits, range(first, len(self._rows)))
        self.pass_seconds["prefill"] += time.perf_counter() - start

    def _decode(self) -> None:
        start = time.perf_counter()
        last = torch.tensor(
            [[row.last_token] for row in self._rows], dtype=torch.long, device=self.device
        )
        names = [row.request.adapter for row in self._rows]
        with torch.inference_mode():
            logits = self._batch.decode(last, names, self._adapters)
        self._count("decode")
        self._advance(logits, range(len(self._rows)))
        self.pass_seconds["decode"] += time.perf_counter() - start

    def _count(self, kind: str) -> None:
        self.steps += 1
        self.pass_counts[kind] += 1

    def _advance(self, logits: torch.Tensor, indices: range) -> None:
        """Sample one token for each row in `indices` (logits row j is rows[indices[j]]), emit
        its text, and drop the rows that are done."""
        rows = [self._rows[i] for i in indices]
        tokens = next_tokens(
            logits,
            [r.request.temperature for r in rows],
            [r.request.top_p for r in rows],
            [r.generator for r in rows],
        )
        for row, token in zip(rows, tokens, strict=True):
            self._push(row, token)
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) < len(self._rows):
            done = [row for row in self._rows if row.finish_reason is not None]
            self._rows = [self._rows[i] for i in keep]
            self._batch.keep_rows(keep)
            for row in done:
                self._finish(row, row.finish_reason)

    def _push(self, row: _Row, token: int) -> None:
        request = row.request
        if request.cancelled:
            row.finish_reason = "cancelled"
            return
        row.last_token = token
        if token in self.eos_ids and not request.ignore_eos:
            row.finish_reason = "stop"
            return
        row.ids.append(token)
        delta, stopped = row.stream.push(token)
        if stopped:
            row.finish_reason = "stop"
        elif len(row.ids) >= min(request.max_tokens, self.max_context - len(request.prompt_ids)):
            row.finish_reason = "length"
        if delta:
            _emit(request, Delta(delta, token))

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        request = row.request
        tail = row.stream.flush()
        if tail and reason not in ("error", "cancelled"):
            _emit(request, Delta(tail, row.last_token))
        request._finish = Finish(
            reason, row.stream.text, len(request.prompt_ids), len(row.ids), error, list(row.ids)
        )
        _emit(request, request._finish)
        request._done.set()

    def _stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(self.tokenizer, stop)

    def _adapters(self, names: list[str | None]):
        if not self.adapters:
            return contextlib.nullcontext()  # no LoRA layers in the model yet
        return per_sample_adapters(self.model, names, self._lora_layers)

    def _adapters_changed(self) -> None:
        self._lora_layers = self._find_lora_layers()
        self._batch.adapters_changed(sorted(self.adapters))

    def _find_lora_layers(self) -> list:
        # Kept between adapter changes: finding them walks every module (ms a step).
        return [layer for _, layer in lora_layers(self.model)]

    def _unload_unused(self) -> None:
        if not self._unloading:
            return
        with self._cond:
            busy = {r.adapter for r in self._pending} | {r.request.adapter for r in self._rows}
            ready = self._unloading - busy
            self._unloading -= ready
        if ready:
            for name in ready:
                if name in self.adapters:
                    delete_adapter(self.model, name)
                    self.adapters.discard(name)
            self._adapters_changed()


def _emit(request: GenerationRequest, event: Event) -> None:
    if request.on_event is None:
        return
    try:
        request.on_event(event)
    except Exception:  # a listener that went away must not stop the batch
        log.exception("event listener failed")


def _context_length(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048
