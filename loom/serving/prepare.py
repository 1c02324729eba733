"""A chat request made ready for the engine, with every check that needs the tokenizer or the engine.

Owns prompt rendering, tokenization and truncation (`truncate_prompt_tokens`), the context-window
check, token-id checks against the vocabulary (`logit_bias`, `allowed_token_ids`), `bad_words`
into token sequences, the priority / scheduling-policy check, and one `SamplingParams` per
sequence to run. Everything here runs before a stream starts, so a request that cannot be
honored is a plain 4xx, never a broken stream. Never submits to the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loom.engine import AsyncEngine, SamplingParams
from loom.serving.choice_output import OutputPlan
from loom.serving.sampling import SamplingOptions, engine_params
from loom.serving.types import ChatRequest, InvalidRequest
from loom.tokenizer import Tokenizer

_INT64_SPAN, _INT64_MIN = 2**64, -(2**63)


@dataclass(frozen=True, slots=True)
class PreparedChat:
    req: ChatRequest
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # the request's params, bad words resolved, logprobs as serving needs them
    echo: str  # prepended to every choice's text ("" = nothing)
    output: OutputPlan = OutputPlan()  # how each choice's text is read back (parsers, tool calls)
    prompt_text: str = ""  # the rendered prompt (a reasoning parser looks for a block it opened)

    def candidate_params(self) -> list[SamplingParams]:
        """One per sampled sequence: n of them, or best_of. Prompt logprobs only on the first."""
        count = self.req.num_candidates
        seed = self.sampling.seed
        params = []
        for i in range(count):
            p = self.sampling
            if seed is not None and count > 1:  # independent yet reproducible: each its own seed
                p = dataclasses.replace(p, seed=(seed + i - _INT64_MIN) % _INT64_SPAN + _INT64_MIN)
            if i > 0 and p.prompt_logprobs is not None:
                p = dataclasses.replace(p, prompt_logprobs=None)
            params.append(p)
        return params


def prepare(req: ChatRequest, prompt_text: str, engine: AsyncEngine) -> PreparedChat:
    """Blocking (tokenizes): callers on an event loop run it in a worker thread."""
    tok = engine.tokenizer
    check_priority(req, engine.scheduling_policy)
    check_token_ids(req.sampling, tok.vocab_size)
    prompt_ids = tokenize_prompt(req, prompt_text, tok, engine.max_model_len)
    check_min_tokens(req.sampling, len(prompt_ids), engine.max_model_len)
    sampling = engine_params(
        req.sampling,
        vocab_size=tok.vocab_size,
        bad_words_ids=bad_words_ids(req.bad_words, tok),
        logprobs=engine_logprobs(req),
        prompt_logprobs=req.report.prompt_logprobs,
    )
    return PreparedChat(req, tuple(prompt_ids), sampling, _echo_text(req))


def tokenize_prompt(req: ChatRequest, prompt_text: str, tok: Tokenizer, max_model_len: int) -> list[int]:
    prompt_ids = tok.encode(prompt_text, add_special_tokens=req.template.add_special_tokens)
    max_tokens = req.sampling.max_tokens
    keep = req.truncate_prompt_tokens
    if keep == -1:  # the model's limit: as much as leaves room for the completion
        keep = max(1, max_model_len - (max_tokens or 1))
    if keep is not None and len(prompt_ids) > keep:
        prompt_ids = prompt_ids[-keep:]
    _check_context(len(prompt_ids), max_tokens, max_model_len)
    return prompt_ids


def _check_context(num_prompt: int, max_tokens: int | None, limit: int) -> None:
    wanted = num_prompt + (max_tokens or 1)
    if wanted > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested {wanted} tokens "
            f"({num_prompt} in the messages, {max_tokens or 1} in the completion). "
            "Please reduce the length of the messages or completion.",
            "messages",
        )


def check_min_tokens(sampling: SamplingOptions | SamplingParams, num_prompt: int, limit: int) -> None:
    room = limit - num_prompt
    if sampling.min_tokens > room:
        raise InvalidRequest(
            f"min_tokens is {sampling.min_tokens}, but the context window of {limit} tokens leaves room for "
            f"{room} after the {num_prompt} prompt tokens",
            "min_tokens",
        )


def check_priority(req: ChatRequest, policy: str) -> None:
    if req.priority != 0 and policy != "priority":
        raise InvalidRequest(
            f"priority {req.priority} needs priority scheduling, but this server schedules '{policy}' "
            "(start it with --scheduling-policy priority)",
            "priority",
            status_code=422,
        )


def check_token_ids(sampling: SamplingOptions, vocab_size: int) -> None:
    for name, ids in (
        ("logit_bias", [token_id for token_id, _ in sampling.logit_bias]),
        ("allowed_token_ids", list(sampling.allowed_token_ids or ())),
        ("stop_token_ids", list(sampling.stop_token_ids)),
    ):
        outside = sorted({i for i in ids if not 0 <= i < vocab_size})
        if outside:
            raise InvalidRequest(
                f"{name} has token ids outside the vocabulary (0..{vocab_size - 1}): {outside[:5]}",
                name,
                status_code=422,
            )


def bad_words_ids(words: tuple[str, ...], tok: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """Each word as it tokenizes alone and after a space (mid-sentence), as vLLM does."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in words:
        bare = word.lstrip()
        for text in (bare, " " + bare):
            ids = tuple(tok.encode(text, add_special_tokens=False))
            if ids:
                sequences[ids] = None
    return tuple(sequences)


def engine_logprobs(req: ChatRequest) -> int | None:
    """How many top logprobs the engine reports per token; best_of needs the sampled token's."""
    if req.report.logprobs:
        return req.report.top_logprobs
    if req.num_candidates > req.n and not req.search.beam_search:
        return 0
    return None


def _echo_text(req: ChatRequest) -> str:
    """The spec's echo: the answer repeats the last message when it has the answer's role."""
    if not req.report.echo or not req.messages:
        return ""
    last = req.messages[-1]
    return last.content or "" if last.role == "assistant" else ""
