"""Model runner: turns a `SchedulerOutput` into one forward pass over a flattened batch.

Owns the KV cache tensors and the per-step input tensors (input ids, positions, slot mapping,
attention metadata). Never decides what runs; never samples. A compiled or fused forward can be
swapped in through `forward_fn` without touching scheduling or sampling.

Prompt logprobs: for a request with `params.prompt_logprobs`, every prompt position p < P - 1 it
computes also becomes a logits row (after the R sampling rows), and the runner appends to
`req.prompt_logprobs` prompt token p + 1's raw logprob, rank and top k under position p. Chunks
accumulate across steps; positions already recorded (a recompute after preemption) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loom.engine.request import Request
from loom.engine.sampler import token_logprobs
from loom.engine.scheduler import SchedulerOutput
from loom.models.attention import AttentionMetadata, DecodeBlocks, DecodeGather, PrefillSpan, zeroed_kv_cache
from loom.models.llama import LlamaModel
from loom.models.native import native_decode_supported


@dataclass(frozen=True, slots=True)
class PromptLogprobSpan:
    """Prompt positions `first .. first + num - 1` of `req`, whose logits rows follow one another."""

    req: Request
    first: int
    num: int


@dataclass(frozen=True, slots=True)
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R + sum of prompt span lengths]
    sampling_reqs: list[Request]  # row r < R of the logits belongs to sampling_reqs[r]
    prompt_spans: tuple[PromptLogprobSpan, ...] = ()  # rows R onwards, span after span


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.dtype = dtype
        shape = (2 * cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)  # K heads, then V heads
        # lazily zeroed: `torch.zeros` would write the whole cache at start-up (~0.5 s per GiB)
        self.kv_caches = [zeroed_kv_cache(shape, dtype) for _ in range(cfg.num_layers)]
        self.head_offsets = (torch.arange(2 * cfg.num_kv_heads) * num_blocks).unsqueeze(1)  # [2*kv, 1]
        self.native_decode = native_decode_supported(
            dtype, self.kv_caches[0].device, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size
        )
        self.forward_fn: Callable[..., torch.Tensor] = model.forward

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        """Runs the step; returns logits `[R, vocab]` and the requests they belong to (and records prompt logprobs)."""
        inp = self.prepare(sched)
        logits = self.forward_fn(inp.input_ids, inp.positions, self.kv_caches, inp.meta, inp.logits_indices)
        if inp.prompt_spans:
            num_sampling = len(inp.sampling_reqs)
            _record_prompt_logprobs(logits[num_sampling:], inp.prompt_spans)
            logits = logits[:num_sampling]
        return logits, inp.sampling_reqs

    def prepare(self, sched: SchedulerOutput) -> ModelInput:
        decodes = [req for req, n in sched.scheduled if n == 1]
        # chunks of output (a grammar's forced tokens: past the prompt) before prompt chunks: the
        # model may give them the small-batch kernels, as it gives decode rows
        outputs = [(req, n) for req, n in sched.scheduled if n > 1 and req.num_computed_tokens >= req.num_prompt_tokens]
        prompts = [(req, n) for req, n in sched.scheduled if n > 1 and req.num_computed_tokens < req.num_prompt_tokens]
        prefills = outputs + prompts
        num_output_chunk_tokens = sum(n for _, n in outputs)
        ids: list[int] = [req.token_at(req.num_computed_tokens) for req in decodes]
        positions: list[int] = [req.num_computed_tokens for req in decodes]
        slots: list[int] = [self._slot(req, req.num_computed_tokens) for req in decodes]
        sampling_reqs = [req for req in decodes if req.num_computed_tokens + 1 == req.num_tokens]
        logits_idx = [i for i, req in enumerate(decodes) if req.num_computed_tokens + 1 == req.num_tokens]
        spans = []
        for req, n in prefills:
            start, first = len(ids), req.num_computed_tokens
            ids.extend(req.token_at(p) for p in range(first, first + n))
            positions.extend(range(first, first + n))
            context_slots = self._slots(req, first + n)
            slots.extend(context_slots[first:].tolist())
            spans.append(PrefillSpan(start, start + n, context_slots, is_first_chunk=first == 0))
            if first + n == req.num_tokens:
                sampling_reqs.append(req)
                logits_idx.append(start + n - 1)
        prompt_spans = _prompt_logprob_spans(sched)
        if prompt_spans:
            starts = _flat_starts(decodes, prefills)
            for span in prompt_spans:
                start = starts[span.req.req_id] + span.first - span.req.num_computed_tokens
                logits_idx.extend(range(start, start + span.num))
        meta = AttentionMetadata(
            _long(slots),
            self.block_size,
            len(decodes),
            self._decode_context(decodes),
            tuple(spans),
            num_output_chunk_tokens,
        )
        return ModelInput(_long(ids), _long(positions), meta, _long(logits_idx), sampling_reqs, prompt_spans)

    def _slot(self, req: Request, position: int) -> int:
        return req.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _slots(self, req: Request, num_tokens: int) -> torch.Tensor:
        pos = torch.arange(num_tokens)
        table = torch.tensor(req.block_ids)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode_context(self, decodes: list[Request]) -> DecodeBlocks | DecodeGather | None:
        """Every decode request's blocks (padded with block 0) and context length: as they are for
        the native kernel, else as cache rows to gather and an additive mask of valid tokens."""
        if not decodes:
            return None
        lens = [req.num_computed_tokens + 1 for req in decodes]
        max_blocks = -(-max(lens) // self.block_size)
        rows = [_padded(req.block_ids[:max_blocks], max_blocks) for req in decodes]
        if self.native_decode:
            return DecodeBlocks(torch.tensor(rows, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))
        table = torch.tensor(rows)
        # row of (head h, block b) in the cache viewed as [2*kv_heads * num_blocks, block_size * head_dim]
        gather = (self.head_offsets + table.reshape(1, -1)).reshape(-1)
        pos = torch.arange(max_blocks * self.block_size)
        valid = (pos.unsqueeze(0) < torch.tensor(lens).unsqueeze(1)).view(len(decodes), 1, -1)
        mask = torch.zeros(valid.shape, dtype=self.dtype).masked_fill_(~valid, float("-inf"))
        return DecodeGather(gather, mask)


def _prompt_logprob_spans(sched: SchedulerOutput) -> tuple[PromptLogprobSpan, ...]:
    """The prompt positions this step computes whose logprobs are still missing."""
    spans = []
    for req, n in sched.scheduled:
        if req.prompt_logprobs is None:
            continue
        if req.num_computed_tokens > len(req.prompt_logprobs) and not req.output_ids:
            raise RuntimeError(
                f"request {req.req_id}: prompt logprobs need every prompt position computed, but it starts at "
                f"{req.num_computed_tokens}; the prefix cache must not serve requests with prompt_logprobs"
            )
        # position p yields prompt token p + 1: the last prompt position is a sampling row instead
        first = max(req.num_computed_tokens, len(req.prompt_logprobs))
        end = min(req.num_computed_tokens + n, req.num_prompt_tokens - 1)
        if first < end:
            spans.append(PromptLogprobSpan(req, first, end - first))
    return tuple(spans)


def _flat_starts(decodes: list[Request], prefills: list[tuple[Request, int]]) -> dict[str, int]:
    """Each scheduled request's first row in the flattened batch: decodes first, then prefills in order."""
    starts = {req.req_id: i for i, req in enumerate(decodes)}
    offset = len(decodes)
    for req, n in prefills:
        starts[req.req_id] = offset
        offset += n
    return starts


def _record_prompt_logprobs(logits: torch.Tensor, spans: tuple[PromptLogprobSpan, ...]) -> None:
    """Appends one `TokenLogprob` per row of `logits` `[sum of span lengths, vocab]` to its request."""
    targets: list[int] = []
    num_top: list[int] = []
    for span in spans:
        targets.extend(span.req.prompt_ids[span.first + 1 : span.first + 1 + span.num])
        num_top.extend([span.req.params.prompt_logprobs or 0] * span.num)
    records = token_logprobs(logits.log_softmax(dim=-1), _long(targets), num_top)
    offset = 0
    for span in spans:
        assert span.req.prompt_logprobs is not None and len(span.req.prompt_logprobs) == span.first
        span.req.prompt_logprobs.extend(records[offset : offset + span.num])
        offset += span.num


def _padded(block_ids: list[int], length: int) -> list[int]:
    return block_ids + [0] * (length - len(block_ids))


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
