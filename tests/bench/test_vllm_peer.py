"""The vLLM peer's set-up without installing vLLM: the default GGUF exported to the Hugging Face
folder vLLM reads (real weights, real tokenizer), keyed by the file, and the command and
environment the bench starts it with."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from loom.bench import vllm_setup
from loom.bench.hf_baseline import load_tokenizer
from loom.bench.targets import LaunchSettings, TargetSpec, managed_command, vllm_env


def test_the_model_folder_key_follows_the_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    first = vllm_setup.model_dir(tmp_path, gguf)
    assert first == vllm_setup.model_dir(tmp_path, gguf) and first.name.startswith("m-")
    gguf.write_bytes(b"other")
    os.utime(gguf, ns=(1, 1))
    assert vllm_setup.model_dir(tmp_path, gguf) != first


def test_the_gguf_is_exported_once_as_a_folder_vllm_reads(tmp_path: Path, model_path: Path) -> None:
    cache = tmp_path / "cache"
    fake_python = cache / "vllm-venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("")
    settings = LaunchSettings(
        str(model_path), "auto", tmp_path, "s", 10.0, cache, vllm_args=("--gpu-memory-utilization 0.2",)
    )
    cmd = managed_command(TargetSpec("vllm", "vllm"), settings, 8090, print)
    folder = Path(cmd[cmd.index("--model") + 1])
    assert folder == vllm_setup.model_dir(cache, model_path)
    assert cmd[:3] == [str(fake_python), "-m", "vllm.entrypoints.openai.api_server"]
    # the bench's default share comes first, so the user's own value (the last one) wins
    assert cmd[-4:] == ["--gpu-memory-utilization", "0.3", "--gpu-memory-utilization", "0.2"]

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight")
        assert len([name for name in weights.keys() if name.startswith("model.layers.")]) == 30 * 9
    assert str(embed.dtype) == "torch.bfloat16" and tuple(embed.shape) == (49152, 576)
    assert embed.float().abs().sum() > 0
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    exported, original = AutoTokenizer.from_pretrained(folder), load_tokenizer(str(model_path))
    text = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "France" in text and exported(text).input_ids == original(text).input_ids

    written = (folder / "config.json").stat().st_mtime_ns
    assert vllm_setup.export_model(model_path, folder, print) == folder
    assert (folder / "config.json").stat().st_mtime_ns == written  # the second call found it


def test_vllm_binds_every_core_the_bench_gives_it() -> None:
    env = vllm_env(2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"
