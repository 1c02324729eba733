"""The Hugging Face `transformers` peer of `loom bench`: the same GGUF weights under `generate`.

Owns the GGUF's tokenizer (the workload cuts its prompts with it, so every target sees the same
text), the dequantized model and the timing loop: one `generate` per sweep level, the level's
prompts as one left-padded batch, sampled as the HTTP targets are. Never talks to a server: the
runner calls `run_hf` only when no server it started is running, because on a small machine the
two would fight over the same cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_accelerate_available

from loom.bench.stats import LoadAverage, read_loadavg

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class HFSettings:
    model_path: str  # a .gguf file; transformers dequantizes it to a dense model
    dtype_name: str  # a torch dtype name: "bfloat16", "float32", ...
    num_threads: int
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None


@dataclass(frozen=True, slots=True)
class HFResult:
    batch_size: int
    prompt_tokens: int  # summed over the batch, chat template included, padding not
    completion_tokens: int  # summed over the batch
    wall_s: float
    tokens_per_s: float
    load_start: LoadAverage
    load_end: LoadAverage


def split_gguf_path(model_path: str) -> tuple[str, str]:
    """`from_pretrained(dir, gguf_file=name)` wants the folder and the file name apart."""
    path = Path(model_path)
    return str(path.parent), path.name


def load_tokenizer(model_path: str) -> Any:
    folder, name = split_gguf_path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Left padding keeps every row's last prompt token adjacent to its first generated one.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_path: str, dtype: torch.dtype) -> Any:
    """Dequantize the GGUF into a plain HF model; fall back to a manual load without `accelerate`.

    `from_pretrained(gguf_file=...)` refuses to run unless `accelerate` is installed, and the
    project does not depend on it; the fallback does the same dequantization by hand.
    """
    folder, name = split_gguf_path(model_path)
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    else:
        model = load_dense_model(folder, name, dtype)
    return model.eval()


def load_dense_model(folder: str, name: str, dtype: torch.dtype) -> Any:
    """Every GGUF tensor dequantized into a plain model with no quantizer attached, so
    `save_pretrained` writes it (the vLLM peer's export) and no `accelerate` is needed."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parsed = load_gguf_checkpoint(
        os.path.join(folder, name), return_tensors=True, model_to_load=model, torch_dtype=dtype
    )
    result = model.load_state_dict(parsed["tensors"], strict=False)
    model.tie_weights()
    # A tied lm_head is legitimately absent from the GGUF; anything else missing is a broken load.
    missing = [key for key in result.missing_keys if key != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF load mismatch: missing={missing} unexpected={result.unexpected_keys}")
    return model


def weight_layout(model: Any) -> str:
    """Say whether transformers kept GGUF blocks packed: the peer is meant to be a dense model.

    transformers 5.x warns that packed weights are "fastest in float32" even when, for an
    architecture it cannot keep packed (llama), it has dequantized everything into `nn.Linear`.
    """
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    dtypes = sorted({str(param.dtype).removeprefix("torch.") for param in model.parameters()})
    return f"packed GGUF in {len(packed)} modules" if packed else f"dense {'/'.join(dtypes)}"


def chat_inputs(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    # The template already wrote the special tokens; adding them again would shift the prompt.
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def time_generate(
    model: Any, inputs: dict[str, torch.Tensor], settings: HFSettings, max_new_tokens: int, pad_token_id: int
) -> tuple[float, int]:
    """Wall seconds and generated tokens (summed over the batch) for one `generate`."""
    sampling: dict[str, Any] = {"do_sample": settings.temperature > 0}
    if settings.temperature > 0:
        sampling |= {"temperature": settings.temperature, "top_p": settings.top_p or 1.0, "top_k": 0}
    start = time.perf_counter()
    with torch.inference_mode():
        output_ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # the peer of the HTTP targets' ignore_eos
            pad_token_id=pad_token_id,
            **sampling,
        )  # [batch, prompt_len + new_len]
    wall_s = time.perf_counter() - start
    num_new = (output_ids.shape[1] - inputs["input_ids"].shape[1]) * output_ids.shape[0]
    return wall_s, int(num_new)


def run_hf(settings: HFSettings, tokenizer: Any, batches: Sequence[Sequence[str]], log: Log = print) -> list[HFResult]:
    """One `generate` per batch of prompts (a sweep level), after a warm-up."""
    torch.set_num_threads(settings.num_threads)
    log(f"hf: loading {settings.model_path} ({settings.dtype_name}, {settings.num_threads} threads)")
    model = load_model(settings.model_path, getattr(torch, settings.dtype_name))
    log(f"hf: weights are {weight_layout(model)}")
    pad_token_id = int(tokenizer.pad_token_id)
    log("hf: warm-up (batch 1, 8 tokens)")
    time_generate(model, chat_inputs(tokenizer, ["Hello, how are you?"]), settings, 8, pad_token_id)
    results = []
    for prompts in batches:
        load_start = read_loadavg()
        log(f"hf: batch {len(prompts)} x {settings.max_new_tokens} tokens ... (load average {load_start})")
        inputs = chat_inputs(tokenizer, prompts)
        wall_s, num_new = time_generate(model, inputs, settings, settings.max_new_tokens, pad_token_id)
        result = HFResult(
            batch_size=len(prompts),
            prompt_tokens=int(inputs["attention_mask"].sum()),
            completion_tokens=num_new,
            wall_s=wall_s,
            tokens_per_s=num_new / wall_s,
            load_start=load_start,
            load_end=read_loadavg(),
        )
        log(
            f"hf: batch {len(prompts)}: {result.tokens_per_s:.1f} tok/s in {wall_s:.2f}s (load average {result.load_end})"
        )
        results.append(result)
    return results
