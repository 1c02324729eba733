"""A grammar's forced output tokens are computed as a chunk, like a prompt's, but they are output:
the runner lists those chunks right after the decode rows, and the model gives them the
small-batch kernels with the decode rows when both fit (prompt rows never take them)."""

from __future__ import annotations

import torch
from tiny_engine import tiny_model

from loom.engine.request import EngineRequest, Request
from loom.engine.runner import ModelRunner
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import SchedulerOutput
from loom.models.attention import AttentionMetadata

BLOCK_SIZE = 4


def _request(req_id: str, prompt_len: int, outputs: int, computed: int, first_block: int) -> Request:
    req = Request(EngineRequest(req_id, tuple(range(10, 10 + prompt_len)), SamplingParams()), eos_token_id=None)
    req.output_ids = list(range(50, 50 + outputs))
    req.num_computed_tokens = computed
    req.block_ids = list(range(first_block, first_block + 4))
    return req


def test_output_chunks_follow_the_decode_rows_and_are_counted() -> None:
    runner = ModelRunner(tiny_model(), 64, BLOCK_SIZE, torch.float32)
    prompt = _request("prompt", 6, 0, 0, 1)  # a first prompt chunk
    forced = _request("forced", 4, 3, 5, 5)  # prompt done, one output computed, two forced ones to go
    decode = _request("decode", 4, 1, 4, 9)
    inp = runner.prepare(SchedulerOutput([(prompt, 6), (forced, 2), (decode, 1)]))
    meta = inp.meta
    assert meta.num_decode_tokens == 1 and meta.num_output_chunk_tokens == 2
    first, second = meta.prefill_spans
    assert (first.start, first.end, second.start, second.end) == (1, 3, 3, 9)  # forced chunk before the prompt's
    assert inp.positions.tolist() == [4, 5, 6, 0, 1, 2, 3, 4, 5]
    assert [req.req_id for req in inp.sampling_reqs] == ["decode", "forced", "prompt"]


def _meta(decodes: int, forced: int) -> AttentionMetadata:
    return AttentionMetadata(torch.zeros(0, dtype=torch.long), BLOCK_SIZE, decodes, None, (), forced)


def test_forced_rows_take_the_small_batch_kernels_only_when_they_fit_with_the_decode_rows() -> None:
    model = tiny_model()
    model.max_small_batch_rows = 4
    assert model._num_small_rows(_meta(2, 2)) == 4
    assert model._num_small_rows(_meta(2, 3)) == 2  # the decode rows keep theirs
    assert model._num_small_rows(_meta(5, 0)) == 0
    assert model._num_small_rows(_meta(0, 3)) == 3
