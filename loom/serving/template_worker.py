"""The chat-template worker: renders Jinja chat templates in a process the server can kill.

Owns the sandbox every template runs in (the model's own and a request's): Jinja's
`ImmutableSandboxedEnvironment`, no loader (`include` / `import` / `extends` are refused), a small
`range`, and `*`, `**`, `+` checked before they build a huge value; the output-size budget; the
worker's address-space limit (a memory bomb is a `MemoryError`, not a server swap storm); the
compiled-template LRU; and the wire protocol below. Never imports Loom, torch or anything beyond
jinja2 and the standard library: the server starts this file by path (`python -P`), so a fresh
worker is up in ~100 ms and a replaced one costs the server nothing.

Protocol, one JSON line each way over stdin / stdout (UTF-8 with surrogates passed through):
  worker -> server, once at start-up: `ready`
  server -> worker: {"source": str, "context": {...render arguments...}}
  worker -> server: {"text": str} or {"error": str, "retire": bool}
`retire` asks the server to replace this worker (after a MemoryError its heap is suspect).
The worker exits when stdin closes or its parent is gone, so it never outlives the server.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, BinaryIO

from jinja2 import BaseLoader, Template, TemplateError, TemplateNotFound
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 10_000  # items one `range()` may make; chat templates range over messages at most
MAX_POWER_BITS = 1024  # `a ** b` on integers may make a number of at most this many bits
CACHE_SIZE = 16  # compiled templates kept (the model's own, plus a few trusted request templates)
_ENCODING = ("utf-8", "surrogatepass")


class TemplateBudgetError(TemplateError):
    """A template tried to build more than its budget allows."""


class _RefusingLoader(BaseLoader):
    def get_source(self, environment: Any, template: str) -> Any:
        raise TemplateNotFound(template, "chat templates cannot include, import or extend other templates")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """The `tojson` Hugging Face chat templates expect (no HTML escaping, unlike Jinja's own)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _bounded_range(*args: int) -> range:
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise TemplateBudgetError(f"range() of {len(values)} items is over the limit of {MAX_RANGE}")
    return values


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators that can build a huge value in one step checked first."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, loader=_RefusingLoader(), extensions=[loopcontrols])
        self.max_output_chars = max_output_chars
        self.globals.pop("lipsum", None)  # lipsum(10**9) is a loop the budget would have to stop
        self.globals.update(range=_bounded_range, raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.filters["tojson"] = _tojson

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            self._check_length(_repeated_length(left, right) or _repeated_length(right, left))
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            self._check_length(len(left) + len(right))
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if max(abs(left).bit_length(), 1) * right > MAX_POWER_BITS:
                raise TemplateBudgetError(f"{left} ** {right} is over the limit of {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)

    def _check_length(self, length: int) -> None:
        if length > self.max_output_chars:
            raise TemplateBudgetError(
                f"the chat template built a value of {length} items, over the limit of {self.max_output_chars}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _repeated_length(sequence: Any, times: Any) -> int:
    if isinstance(sequence, str | list | tuple) and _is_int(times):
        return len(sequence) * max(times, 0)
    return 0


class TemplateRenderer:
    """Compiles (with an LRU) and renders, stopping once the output passes its budget."""

    def __init__(self, max_output_chars: int) -> None:
        self._env = BoundedEnvironment(max_output_chars)
        self._compiled: OrderedDict[str, Template] = OrderedDict()

    def render(self, source: str, context: dict[str, Any]) -> str:
        template = self._compile(source)
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > self._env.max_output_chars:
                raise TemplateBudgetError(
                    f"the chat template's output is over the limit of {self._env.max_output_chars} characters"
                )
            pieces.append(piece)
        return "".join(pieces)

    def _compile(self, source: str) -> Template:
        template = self._compiled.pop(source, None) or self._env.from_string(source)
        self._compiled[source] = template
        if len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return template


def handle(renderer: TemplateRenderer, line: bytes) -> dict[str, Any]:
    """One request line -> one reply; every failure a template can cause becomes a plain message."""
    try:
        request = json.loads(line.decode(*_ENCODING))
        return {"text": renderer.render(request["source"], request["context"])}
    except MemoryError:
        return {"error": "the chat template ran out of its memory budget", "retire": True}
    except RecursionError:
        return {"error": "the chat template recursed too deeply", "retire": False}
    except TemplateError as exc:
        return {"error": f"chat template error: {_plain(exc)}", "retire": False}
    except Exception as exc:  # a template may raise anything (TypeError, OverflowError, ...): all its fault
        return {"error": f"chat template error: {type(exc).__name__}: {_plain(exc)}", "retire": False}


def _plain(exc: BaseException) -> str:
    """The exception's own message, one bounded line (no traceback, no path)."""
    text = " ".join(str(exc).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def serve(stdin: BinaryIO, stdout: BinaryIO, max_output_chars: int) -> None:
    renderer = TemplateRenderer(max_output_chars)
    stdout.write(b"ready\n")
    stdout.flush()
    for line in stdin:
        reply = handle(renderer, line)
        stdout.write(json.dumps(reply, ensure_ascii=False).encode(*_ENCODING) + b"\n")
        stdout.flush()
        if reply.get("retire"):
            return


def _exit_when_orphaned(parent_pid: int) -> None:
    """Stdin EOF ends an idle worker; this ends one mid-render whose server died without `close`."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def main() -> None:
    max_output_chars, memory_limit_bytes = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; stdin EOF ends us
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    if memory_limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    sys.setrecursionlimit(1000)  # a recursive macro stops here, far from the C stack's end
    serve(sys.stdin.buffer, sys.stdout.buffer, max_output_chars)


if __name__ == "__main__":
    main()
