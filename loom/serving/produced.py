"""`Produced`: what the engine has made for one request so far, counted as its outputs arrive.

A request's `Usage` normally comes with its result; a request cancelled midway (its client left)
has no result, yet its caller must bill the tokens made up to the abort. `ChatService` feeds
every engine output of a request into the `Produced` its caller passed, so the caller can read
`usage()` whenever the request ends, however it ends. The numbers are the ones a finished
request reports: prompt tokens once per prompt, every generated token of every sequence, and
the cached prompt tokens the fewest any sequence of a prompt reused. `on_tokens(n)` hears each
output's new tokens as they arrive (latency metrics). Never touches HTTP or money.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from loom.engine import RequestOutput
from loom.serving.types import Usage


class Produced:
    """One request's tally; a completions request with several prompts keeps one per prompt."""

    def __init__(self, on_tokens: Callable[[int], None] | None = None) -> None:
        self._on_tokens = on_tokens
        self._prompts: list[PromptTally] = []

    def prompt(self, num_prompt_tokens: int) -> PromptTally:
        """The tally of one prompt's sequences (one `ChatService` call)."""
        tally = PromptTally(num_prompt_tokens, self._on_tokens)
        self._prompts.append(tally)
        return tally

    def usage(self) -> Usage:
        usages = [t.usage() for t in self._prompts]
        return Usage(
            sum(u.prompt_tokens for u in usages),
            sum(u.completion_tokens for u in usages),
            sum(u.cached_tokens for u in usages),
        )


@dataclass(slots=True)
class PromptTally:
    num_prompt_tokens: int
    on_tokens: Callable[[int], None] | None = None
    num_output: dict[str, int] = field(default_factory=dict)  # engine request id -> tokens so far
    num_cached: dict[str, int] = field(default_factory=dict)  # engine request id -> cached prompt tokens

    def add(self, out: RequestOutput) -> None:
        self.num_output[out.req_id] = out.num_output_tokens
        self.num_cached[out.req_id] = max(self.num_cached.get(out.req_id, 0), out.num_cached_tokens)
        if self.on_tokens is not None:
            self.on_tokens(len(out.new_token_ids))

    def searched(self, num_generated: int, num_cached: int) -> None:
        """A beam search's own count (its steps are many one-token engine requests)."""
        self.num_output = {"search": num_generated}
        self.num_cached = {"search": num_cached}

    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, sum(self.num_output.values()), min(self.num_cached.values(), default=0))

    async def observe(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """`outputs`, counted on the way through; closing this closes (aborts) them."""
        async with aclosing(outputs) as stream:  # type: ignore[type-var]
            async for out in stream:
                self.add(out)
                yield out
