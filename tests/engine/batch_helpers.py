"""Helpers shared by the sampler tests: admit hand-made requests and run them through one batch."""

from __future__ import annotations

import torch

from loom.engine.logits_processors import apply_logits_processors
from loom.engine.request import EngineRequest, Request
from loom.engine.sampler import Sampler, SamplerOutput
from loom.engine.sampling_batch import SamplingBatch, admit_sampling, draw_uniforms, row_input
from loom.engine.sampling_params import SamplingParams


def admitted_request(
    req_id: str, prompt: tuple[int, ...], vocab_size: int, eos: int, output_ids: tuple[int, ...] = (), **params: object
) -> Request:
    """A request as the core admits it (its fixed sampling row built), with some output already."""
    req = Request(EngineRequest(req_id, prompt, SamplingParams(**params)), eos_token_id=eos)  # type: ignore[arg-type]
    admit_sampling(req, vocab_size)
    req.output_ids.extend(output_ids)
    return req


def build_batch(reqs: list[Request], grammar_masks: list[torch.Tensor | None] | None = None) -> SamplingBatch:
    masks = grammar_masks or [None] * len(reqs)
    uniforms = draw_uniforms(reqs)
    return SamplingBatch.build([row_input(r, m, u) for r, m, u in zip(reqs, masks, uniforms, strict=True)])


def sample_output(logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
    with torch.inference_mode():
        return Sampler().sample(logits.clone(), build_batch(reqs))


def processed(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    out = logits.clone()
    apply_logits_processors(out, build_batch(reqs))
    return out
