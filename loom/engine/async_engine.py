"""`AsyncEngine`: the asyncio-facing client of the engine core, which runs on its own thread.

Owns, per request, the incremental detokenizer, stop strings and an output queue; the core thread
owns scheduling and the model. They talk through a command queue (add / abort) one way and
`loop.call_soon_threadsafe` batches of `CoreOutput` the other way, so HTTP never waits on a
forward pass and a forward pass never waits on HTTP. A consumer that stops iterating (a client
that disconnected) aborts its request in the core, which frees its KV blocks on the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from loom.engine.core import EngineCore
from loom.engine.detokenizer import IncrementalDetokenizer
from loom.engine.heap import HeapTrimmer
from loom.engine.logprobs import TokenLogprob
from loom.engine.request import EngineRequest
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import CoreOutput
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    req_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token id
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first output only
    num_cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A read-only snapshot for metrics and admission; the counters are cumulative since start."""

    num_running: int  # requests in the running batch
    num_waiting: int  # submitted, not yet running (the scheduler's queue and commands not yet applied)
    kv_cache_usage: float  # 0..1: KV blocks held by requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    num_forced_tokens: int = 0  # tokens grammar fast-forward appended without sampling


class EngineError(RuntimeError):
    """The core failed while running a request; the request is over, the engine keeps serving."""


def server_failed(req_id: str) -> EngineError:
    """What a failed request's stream learns: no exception text, no path (the core logged those)."""
    return EngineError(f"The server failed while processing request {req_id}.")


@dataclass(slots=True)
class _Stream:
    detok: IncrementalDetokenizer
    queue: asyncio.Queue[RequestOutput | EngineError]
    include_stop_token: bool
    num_output_tokens: int = 0
    finished: bool = False


class AsyncEngine:
    def __init__(self, core_factory: Callable[[], EngineCore], tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._core_factory = core_factory
        self._core: EngineCore | None = None
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # the core is built, or failed to build (`_failure`)
        self._failure: list[BaseException] = []
        self._prefix_queries = 0
        self._prefix_hits = 0

    def start_core(self) -> None:
        """Builds the core on its own thread and returns once it is ready (or raises why not)."""
        self.begin_core()
        self.wait_core()

    def begin_core(self) -> None:
        """Starts building the core on its own thread; `wait_core` returns once it is ready.

        The model is loaded on the same thread that runs it: OpenMP keeps a hot worker team per
        thread, and a model loaded on one thread but run on another decodes ~1.5x slower on CPU.
        """

        def main() -> None:
            try:
                self._core = self._core_factory()
            except BaseException as exc:
                self._failure.append(exc)
                return
            finally:
                self._ready.set()
            self._run_core()

        self._thread = threading.Thread(target=main, name="loom-engine-core", daemon=True)
        self._thread.start()

    def wait_core(self) -> None:
        """Blocks until the core `begin_core` started is built; raises what stopped it."""
        self._ready.wait()
        if self._failure:
            raise self._failure[0]

    def start(self) -> None:
        """Attaches the running event loop, to which the core delivers its outputs."""
        self._loop = asyncio.get_running_loop()

    @property
    def core(self) -> EngineCore:
        if self._core is None:
            raise RuntimeError("the engine core is not built yet: call start_core()")
        return self._core

    @property
    def max_model_len(self) -> int:
        return self.core.scheduler.config.max_model_len

    @property
    def scheduling_policy(self) -> str:
        return self.core.scheduler.config.policy

    def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """Read on the event loop while the core thread runs: each number is current, the set is
        not one atomic moment (enough for gauges and overload admission)."""
        if self._core is None:
            return EngineStats(0, len(self._streams), 0.0, 0, 0, 0)
        sched = self._core.scheduler
        num_running = len(sched.running)
        kv_usage = 1.0 - sched.kv.num_free_blocks / max(sched.kv.pool.num_blocks, 1)
        return EngineStats(
            num_running, max(0, len(self._streams) - num_running), kv_usage,
            self._prefix_queries, self._prefix_hits, sched.num_preemptions, self._core.num_forced_tokens,
        )  # fmt: skip

    async def generate(
        self,
        req_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already running")
        detok = IncrementalDetokenizer(
            self.tokenizer,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        stream = _Stream(detok, asyncio.Queue(), params.include_stop_str_in_output)
        self._streams[req_id] = stream
        self._commands.put(("add", EngineRequest(req_id, tuple(prompt_ids), params, priority, cache_salt)))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self._commands.put(("abort", req_id))
            self._streams.pop(req_id, None)

    def _run_core(self) -> None:
        heap = HeapTrimmer()
        while True:
            idle = not self.core.has_work
            if idle:
                heap.idle()
            if not self._drain_commands(block=idle):
                return
            try:
                outputs = self.core.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the process
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            heap.worked()
            if outputs:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _drain_commands(self, block: bool) -> bool:
        """Applies pending add/abort commands; False once asked to stop."""
        while True:
            try:
                kind, payload = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                assert isinstance(payload, EngineRequest)
                self.core.add_request(payload)
            elif kind == "abort":
                self.core.abort_request(str(payload))

    def _fail_all(self, exc: Exception) -> None:
        """Last resort (the step failed outside any one request's work): every request ends; the
        traceback was logged, the streams learn only that the server failed."""
        for req_id in list(self.core.scheduler.requests):
            self.core.abort_request(req_id)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail_streams, None)

    def _fail_streams(self, err: EngineError | None) -> None:
        """Ends every open stream with `err`, or (None) each with its own `server_failed` error."""
        for req_id, stream in self._streams.items():
            if not stream.finished:
                stream.finished = True
                stream.queue.put_nowait(err or server_failed(req_id))

    def _dispatch(self, outputs: list[CoreOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is None or stream.finished:
                continue  # the client left, or a stop string already ended it
            if out.finish_reason == "error":  # its own work failed in the core (logged there)
                stream.finished = True
                stream.queue.put_nowait(server_failed(out.req_id))
                continue
            stream.queue.put_nowait(self._to_request_output(out, stream))

    def _to_request_output(self, out: CoreOutput, stream: _Stream) -> RequestOutput:
        if stream.num_output_tokens == 0:  # the first output comes once the prompt is in the cache
            self._prefix_queries += out.num_prompt_tokens
            self._prefix_hits += out.num_cached_tokens
        stream.num_output_tokens += len(out.new_token_ids)
        text_ids = out.new_token_ids
        if out.ended_by_token and not stream.include_stop_token:
            text_ids = text_ids[:-1]  # the EOS / stop token ended it: counted in usage, not shown as text
        delta = stream.detok.update(text_ids)
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        text = delta.text
        if delta.stop_str is not None:
            finish_reason, stop_reason = "stop", delta.stop_str
            if out.finish_reason is None:
                self._commands.put(("abort", out.req_id))
        elif finish_reason is not None:
            text += stream.detok.flush()
        stream.finished = finish_reason is not None
        return RequestOutput(
            out.req_id,
            out.new_token_ids,
            text,
            stream.finished,
            finish_reason,
            stop_reason,
            out.num_prompt_tokens,
            stream.num_output_tokens,
            out.logprobs,
            out.prompt_logprobs,
            out.num_cached_tokens,
        )
