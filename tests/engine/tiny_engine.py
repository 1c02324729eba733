"""A whole engine core in milliseconds: a tiny random Llama over a byte-level tokenizer.

The model is random (seeded, so deterministic), which is all containment and grammar tests
need: the same greedy tokens for the same request alone or batched, and a grammar that has to
steer whatever the model prefers. The tokenizer is a real Hugging Face fast tokenizer (one token
per byte, plus EOS), so grammar backends bridge to it as they do to a real model's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from byte_tokenizer import EOS, byte_tokenizer

from loom.engine.core import EngineCore
from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest
from loom.engine.runner import ModelRunner
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig
from loom.models.config import ModelConfig
from loom.models.llama import LlamaModel

__all__ = ["EOS", "Finished", "build_core", "byte_tokenizer", "run", "tiny_model"]

BLOCK_SIZE = 4


def tiny_model(vocab_size: int = 257, seed: int = 0) -> LlamaModel:
    cfg = ModelConfig(
        architecture="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaModel(cfg, torch.float32)
    with torch.no_grad():  # sharper logits than the default init: greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def build_core(
    model: LlamaModel, num_blocks: int = 128, max_num_batched_tokens: int = 256, fast_forward: bool = True
) -> EngineCore:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens, max_model_len=512), kv
    )
    runner = ModelRunner(model, num_blocks, BLOCK_SIZE, torch.float32)
    return EngineCore(sched, runner, eos_token_id=EOS, fast_forward=fast_forward)


@dataclass
class Finished:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    finished_at_step: int | None = None
    num_outputs: int = 0  # outputs received (one per step that produced tokens)


def run(core: EngineCore, requests: dict[str, tuple[tuple[int, ...], SamplingParams]]) -> dict[str, Finished]:
    """Submits every request at once and steps the core until it is idle."""
    for req_id, (prompt, params) in requests.items():
        core.add_request(EngineRequest(req_id, prompt, params))
    results: dict[str, Finished] = defaultdict(Finished)
    for step in range(10_000):
        if not core.has_work:
            break
        for out in core.step():
            result = results[out.req_id]
            result.token_ids.extend(out.new_token_ids)
            result.num_outputs += 1
            if out.finish_reason is not None:
                result.finish_reason, result.finished_at_step = out.finish_reason, step
    return dict(results)
