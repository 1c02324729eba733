"""A small pool of chat-template worker processes, each one killed and replaced when it overruns.

Owns the worker processes (`template_worker.py` started by path with `python -P`, so they import
jinja2 and the standard library only: never torch, never a fork of a process holding torch
threads), one dispatch thread per worker, the time budget, and the replacement of a worker that
overran, crashed or asked to retire. Never validates a request or knows what a chat message is:
it takes a template source and a JSON-ready context and gives back text or a `RenderFailure`.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one task that overruns. Why not
`multiprocessing` spawn: its children re-import the server's `__main__` (and with it torch).

Each render runs on a dispatch thread that owns one worker at a time:
  take a worker (start it if its slot is empty) -> wait for `ready` -> write the request ->
  wait for the reply until the deadline -> give the worker back,
  or, past the deadline / on EOF: kill it, reap it, and start its replacement at once (the new
  process boots while the answer goes out, so the next render finds it ready).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import selectors
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WORKER_FILE = Path(__file__).with_name("template_worker.py")
_ENCODING = ("utf-8", "surrogatepass")
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PoolLimits:
    num_workers: int
    time_budget_s: float  # per render, from writing the request to reading the whole reply
    max_output_chars: int
    memory_limit_bytes: int  # the worker's RLIMIT_AS; 0 = none
    startup_timeout_s: float = 20.0  # a fresh worker's `ready` (a busy 2-core box can be slow)


class RenderFailure(Exception):
    """A render that produced no text; `overran` when the worker was stopped for its time budget."""

    def __init__(self, message: str, *, overran: bool = False, server_fault: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.overran = overran
        self.server_fault = server_fault  # the pool itself failed (closed, a worker that cannot start)


class _Worker:
    """One worker process and its half-read stdout."""

    def __init__(self, limits: PoolLimits) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(_WORKER_FILE), str(limits.max_output_chars), str(limits.memory_limit_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.ready = False
        self._buffer = bytearray()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_line(self, deadline: float, max_bytes: int) -> bytes | None:
        """The next line, or None at EOF / past the deadline / over `max_bytes`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while (end := self._buffer.find(b"\n")) < 0:
                left = deadline - time.monotonic()
                if left <= 0 or len(self._buffer) > max_bytes or not selector.select(left):
                    return None
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    return None
                self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if not self._buffer:
            self._buffer = bytearray()  # a large reply's capacity is not kept until the next one
        return line

    def send(self, payload: bytes) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(payload + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # a pipe already broken; nothing left to flush
                    pass


@dataclass(slots=True)
class _Slot:
    """A place for one worker; the dispatch thread holding it may swap its worker for a fresh one."""

    worker: _Worker | None = None  # None: not started yet, or its start failed


class TemplatePool:
    """`num_workers` worker slots, served by as many dispatch threads; workers start lazily."""

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(limits.num_workers):
            self._slots.put(_Slot())
        self._threads = ThreadPoolExecutor(max_workers=limits.num_workers, thread_name_prefix="loom-template")
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        # a pool dropped without `close` (an app built in a test, never started) still stops its workers
        weakref.finalize(self, _kill_all, self._live)

    def start(self) -> None:
        """Starts the workers of the free slots that have none and returns at once (they boot on
        their own); a slot in use is left to its render. Never blocks: safe on the event loop."""
        slots = self._take_free_slots()
        try:
            for slot in slots:
                if slot.worker is None:
                    slot.worker = self._spawn()
        finally:
            for slot in slots:
                self._slots.put(slot)

    @property
    def pids(self) -> frozenset[int]:
        with self._lock:
            return frozenset(w.pid for w in self._live)

    async def render(self, source: str, context: dict[str, Any]) -> str:
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._threads, self.render_blocking, source, context)
        except RuntimeError as exc:  # the executor is shut down
            raise RenderFailure("the chat-template renderer is shut down", server_fault=True) from exc
        return await future

    def close(self) -> None:
        """Stops every worker and reaps it; renders in flight or queued fail as server faults.

        Idle workers are stopped whole here. A worker in use is only killed: its dispatch thread
        sees the EOF and closes the pipes itself (closing them from here would race its read).
        """
        with self._lock:
            self._closed = True
        self._threads.shutdown(wait=False)  # queued renders still run: each finds the pool closed at once
        idle = self._take_free_slots()
        for slot in idle:
            if slot.worker is not None:
                self._forget(slot.worker)
                slot.worker = None
            self._slots.put(slot)
        with self._lock:
            busy = list(self._live)
        for worker in busy:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()

    def _take_free_slots(self) -> list[_Slot]:
        slots = []
        while True:
            try:
                slots.append(self._slots.get_nowait())
            except queue.Empty:
                return slots

    def render_blocking(self, source: str, context: dict[str, Any]) -> str:
        """One render on the calling thread (never the event loop's): waits for a free worker."""
        payload = json.dumps({"source": source, "context": context}, ensure_ascii=False).encode(*_ENCODING)
        slot = self._slots.get()
        try:
            worker = self._ready_worker(slot)
            reply = self._exchange(slot, worker, payload)
        finally:
            self._slots.put(slot)
        if "error" in reply:
            raise RenderFailure(str(reply["error"]))
        return str(reply["text"])

    def _exchange(self, slot: _Slot, worker: _Worker, payload: bytes) -> dict[str, Any]:
        """Sends one request and reads its reply; a worker that fails it is replaced in `slot`."""
        deadline = time.monotonic() + self.limits.time_budget_s
        line = worker.read_line(deadline, self._max_reply_bytes()) if worker.send(payload) else None
        reply = _parse_reply(line)
        if reply is None or reply.get("retire"):
            slot.worker = self._replace(worker)
        if reply is not None:
            return reply
        if self._closed:
            raise RenderFailure("the chat-template renderer is shut down", server_fault=True)
        if time.monotonic() >= deadline:
            raise RenderFailure(
                f"chat template exceeded its time budget ({self.limits.time_budget_s:g} s)", overran=True
            )
        raise RenderFailure("the chat template stopped its renderer (the worker crashed or answered too much)")

    def _ready_worker(self, slot: _Slot) -> _Worker:
        worker = slot.worker
        if worker is None or worker.proc.poll() is not None:  # an empty slot, or a worker that died idle
            if worker is not None:
                self._forget(worker)
            slot.worker = None
            worker = slot.worker = self._spawn()
        if not worker.ready:
            deadline = time.monotonic() + self.limits.startup_timeout_s
            if worker.read_line(deadline, 64) != b"ready":
                self._forget(worker)
                slot.worker = None
                raise RenderFailure("a chat-template worker failed to start", server_fault=True)
            worker.ready = True
        return worker

    def _replace(self, worker: _Worker) -> _Worker | None:
        self._forget(worker)
        try:
            return self._spawn()
        except RenderFailure:  # closed meanwhile: the slot stays empty
            return None

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RenderFailure("the chat-template renderer is shut down", server_fault=True)
            try:
                worker = _Worker(self.limits)
            except OSError as exc:  # out of processes or memory: the server's trouble, not the request's
                raise RenderFailure("a chat-template worker failed to start", server_fault=True) from exc
            self._live.add(worker)
            return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.kill()

    def _max_reply_bytes(self) -> int:
        return 4 * self.limits.max_output_chars + 4096  # UTF-8 is at most 4 bytes a character


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()


def _parse_reply(line: bytes | None) -> dict[str, Any] | None:
    if line is None:
        return None
    try:
        reply = json.loads(line.decode(*_ENCODING))
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and ("text" in reply or "error" in reply) else None
