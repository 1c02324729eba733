"""Our Llama forward, run through the whole engine, against Hugging Face transformers on the same weights.

Both sides load the default SmolLM2 GGUF file in float32. Greedy decoding must pick the very same
64 tokens as `generate()`, whether the prompts run batched, with prefill chunked into 7-token
pieces, or preempted and recomputed in a pool too small for all of them; the logits must agree to
float32 rounding at the prompt's last position and at every decode step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loom.engine.core import EngineCore
from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest, Request
from loom.engine.runner import ModelRunner
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loom.models.llama import LlamaModel
from loom.models.registry import load_model
from loom.tokenizer import load_tokenizer

EOS = 2  # SmolLM2's <|im_end|>
BLOCK_SIZE = 16
NUM_NEW_TOKENS = 64
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "You are a terse math tutor."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! What shall we work on?"},
        {"role": "user", "content": "List three prime numbers and explain why each is prime."},
    ],
]


@dataclass(frozen=True, slots=True)
class EngineSetup:
    max_num_batched_tokens: int
    num_blocks: int


SETUPS = {
    "batched": EngineSetup(max_num_batched_tokens=512, num_blocks=64),
    "chunked-prefill": EngineSetup(max_num_batched_tokens=7, num_blocks=64),
    "preempted": EngineSetup(max_num_batched_tokens=512, num_blocks=12),  # ~22 blocks needed in all
}


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: dict[int, list[int]]  # prompt index -> generated ids
    logits: dict[int, torch.Tensor]  # prompt index -> [NUM_NEW_TOKENS, vocab], one row per step
    finish_reasons: dict[int, str | None]
    num_preempted: int = 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread: None) -> None:
    """Every test of this module runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def prompts(model_path: Path) -> list[list[int]]:
    tok = load_tokenizer(model_path)
    texts = [tok.hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS]
    return [tok.encode(text) for text in texts]


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def our_model(model_path: Path) -> LlamaModel:
    return load_model(model_path, torch.float32)


@pytest.fixture(scope="module")
def hf_generation(hf_model: torch.nn.Module, prompts: list[list[int]]) -> Generation:
    tokens, logits = {}, {}
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NUM_NEW_TOKENS,
                min_new_tokens=NUM_NEW_TOKENS,
                eos_token_id=EOS,
                pad_token_id=EOS,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens[i] = out.sequences[0, len(ids) :].tolist()
            logits[i] = torch.cat(out.logits).float()  # raw logits, before the min_new_tokens ban
    return Generation(tokens, logits, {i: "length" for i in tokens})


@pytest.fixture(scope="module")
def our_generation(our_model: LlamaModel, prompts: list[list[int]]) -> Callable[[str], Generation]:
    """Runs each setup at most once per module, on first use."""
    done: dict[str, Generation] = {}

    def run(setup_name: str) -> Generation:
        if setup_name not in done:
            done[setup_name] = _generate(our_model, prompts, SETUPS[setup_name])
        return done[setup_name]

    return run


def _build_engine(model: LlamaModel, setup: EngineSetup) -> EngineCore:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=setup.max_num_batched_tokens)
    sched = Scheduler(config, KVCacheManager(setup.num_blocks, BLOCK_SIZE))
    runner = ModelRunner(model, setup.num_blocks, BLOCK_SIZE, torch.float32)
    return EngineCore(sched, runner, eos_token_id=EOS)


def _generate(model: LlamaModel, prompts: list[list[int]], setup: EngineSetup) -> Generation:
    core = _build_engine(model, setup)
    logit_rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    preempted: list[Request] = []
    execute, schedule = core.runner.execute, core.scheduler.schedule

    def capturing_execute(sched_out: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        logits, reqs = execute(sched_out)
        for row, req in zip(logits, reqs, strict=True):
            logit_rows[req.req_id].append(row.clone())  # the sampler masks EOS in place
        return logits, reqs

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        preempted.extend(out.preempted)
        return out

    core.runner.execute = capturing_execute  # type: ignore[method-assign]
    core.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, min_tokens=NUM_NEW_TOKENS)
    for i, ids in enumerate(prompts):
        core.add_request(EngineRequest(str(i), tuple(ids), params))
    tokens: dict[int, list[int]] = defaultdict(list)
    reasons: dict[int, str | None] = {}
    for _ in range(10_000):
        if not core.has_work:
            break
        for out in core.step():
            tokens[int(out.req_id)].extend(out.new_token_ids)
            reasons[int(out.req_id)] = out.finish_reason
    assert not core.has_work
    logits = {int(r): torch.stack(rows) for r, rows in logit_rows.items()}
    return Generation(dict(tokens), logits, reasons, len(preempted))


def _assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    max_diff = float((ours - theirs).abs().max())
    # measured ~5e-5 on logits up to ~37 (float32 rounding); a real bug (RoPE, norm eps, a mask off
    # by one) moves them by 1e-2 or more, and greedy picks need them within the top-2 margin (~1e-2)
    assert max_diff < 2e-5 * scale, f"max |diff| {max_diff:.2e} vs logit scale {scale:.1f}"


# --- tests -------------------------------------------------------------------------------------


def test_prompts_are_distinct_chat_formatted_token_ids(prompts: list[list[int]]) -> None:
    assert len({tuple(p) for p in prompts}) == len(prompts) == 3
    assert all(p[0] == 1 for p in prompts)  # each starts with <|im_start|>


def test_prompt_last_position_logits_match_transformers(
    our_model: LlamaModel, hf_model: torch.nn.Module, prompts: list[list[int]]
) -> None:
    for ids in prompts:
        core = _build_engine(our_model, SETUPS["batched"])
        core.add_request(EngineRequest("p", tuple(ids), SamplingParams(temperature=0)))
        logits, reqs = core.runner.execute(core.scheduler.schedule())
        assert [r.req_id for r in reqs] == ["p"]
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([ids])).logits[0, -1].float()
        _assert_logits_close(logits[0], theirs)
        assert int(logits[0].argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("setup_name", list(SETUPS))
def test_greedy_tokens_match_transformers(
    setup_name: str, our_generation: Callable[[str], Generation], hf_generation: Generation
) -> None:
    ours: Generation = our_generation(setup_name)
    assert ours.finish_reasons == hf_generation.finish_reasons  # all "length": EOS was suppressed
    for i in range(len(CONVERSATIONS)):
        assert len(ours.token_ids[i]) == NUM_NEW_TOKENS
        assert ours.token_ids[i] == hf_generation.token_ids[i], f"prompt {i}"


@pytest.mark.parametrize("setup_name", list(SETUPS))
def test_every_step_logits_match_transformers(
    setup_name: str, our_generation: Callable[[str], Generation], hf_generation: Generation
) -> None:
    ours: Generation = our_generation(setup_name)
    for i in range(len(CONVERSATIONS)):
        _assert_logits_close(ours.logits[i], hf_generation.logits[i])


def test_small_pool_setup_really_preempts(our_generation: Callable[[str], Generation]) -> None:
    assert our_generation("preempted").num_preempted > 0
    assert our_generation("batched").num_preempted == 0
