"""The prepared-weight cache: a hit builds the same model without reading the GGUF file again, and a
changed file, dtype or quantization is never served from an old entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from loom.models import registry
from loom.models.attention import AttentionMetadata, PrefillSpan
from loom.models.config import ModelConfig
from loom.models.llama import LlamaModel
from loom.models.loader import llama_tensor_shapes
from loom.models.loader_gguf import gguf_to_hf_name
from loom.models.registry import load_model
from loom.models.weight_cache import cache_key, load_cached

CONFIG = ModelConfig(
    architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=2.0**-17, max_position_embeddings=128,
    tie_word_embeddings=True,
)  # fmt: skip
_PARTS = "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down".split()


def write_gguf(path: Path, seed: int, rope_theta: float = CONFIG.rope_theta) -> None:
    """A tied two-layer Llama stored as the default model is: Q4_1 linears, a Q8_0 embedding, F32 norms."""
    gen = torch.Generator().manual_seed(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(CONFIG.num_layers)
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_vocab_size(CONFIG.vocab_size)
    shapes = llama_tensor_shapes(CONFIG)
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{i}.{part}.weight" for i in range(CONFIG.num_layers) for part in _PARTS]
    for name in names:
        shape = shapes[gguf_to_hf_name(name)]
        qtype = GGMLQuantizationType.F32 if len(shape) == 1 else GGMLQuantizationType.Q4_1
        if name == "token_embd.weight":
            qtype = GGMLQuantizationType.Q8_0
        values = torch.randn(shape, generator=gen).numpy()
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model: LlamaModel) -> torch.Tensor:
    """One 6-token prefill, every position's logits."""
    n = 6
    kv = [torch.zeros(2 * CONFIG.num_kv_heads, n, CONFIG.head_dim) for _ in range(CONFIG.num_layers)]
    meta = AttentionMetadata(torch.arange(n), 16, 0, None, (PrefillSpan(0, n, torch.arange(n), True),))
    return model(torch.arange(1, n + 1), torch.arange(n), kv, meta, torch.arange(n))


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "weights").glob("*.safetensors"))


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "tiny.gguf", seed=0)
    return tmp_path / "tiny.gguf"


@pytest.mark.parametrize("quantization", ["none", "int4", "auto", "int8"])
def test_a_cache_hit_builds_the_same_model_without_reading_the_file(
    gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantization: str
) -> None:
    cache = tmp_path / "cache"
    fresh = load_model(gguf, torch.float32, quantization=quantization)
    first = load_model(gguf, torch.float32, quantization=quantization, cache_dir=cache)
    assert len(entries(cache)) == 1

    def no_file_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not read the GGUF file")

    monkeypatch.setattr(registry, "load_sources", no_file_reads)
    cached = load_model(gguf, torch.float32, quantization=quantization, cache_dir=cache)
    assert torch.equal(logits(fresh), logits(first))
    assert torch.equal(logits(cached), logits(fresh))


def test_auto_on_q4_1_weights_builds_int4_layers_and_a_dense_head(gguf: Path, tmp_path: Path) -> None:
    weights = registry.load_prepared(gguf, torch.bfloat16, quantization="auto", cache_dir=tmp_path)
    assert (weights.quantization, weights.head_quantization) == ("int4", "none")
    cached = load_cached(tmp_path, cache_key(gguf, torch.bfloat16, "auto"))
    assert cached is not None and (cached.quantization, cached.head_quantization) == ("int4", "none")
    assert cached.config == CONFIG
    # the tied head keeps the file's Q8_0 blocks for its small-batch kernel, cached as they are
    for key in ("lm_head.q8_codes", "lm_head.q8_scales"):
        assert torch.equal(cached.tensors[key], weights.tensors[key])
    assert cached.tensors["lm_head.q8_codes"].dtype == torch.int8


def test_a_rewritten_file_is_never_served_from_the_old_entry(gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = logits(load_model(gguf, torch.float32, quantization="int4", cache_dir=cache))
    write_gguf(gguf, seed=1)  # other weights, same size and header
    new = logits(load_model(gguf, torch.float32, quantization="int4", cache_dir=cache))
    assert not torch.allclose(old, new)
    assert torch.equal(new, logits(load_model(gguf, torch.float32, quantization="int4")))
    assert len(entries(cache)) == 1  # the old file's entry is gone


def test_the_key_follows_the_header_even_with_the_old_size_and_mtime(gguf: Path) -> None:
    before = cache_key(gguf, torch.float32, "none")
    stat = gguf.stat()
    write_gguf(gguf, seed=0, rope_theta=5000.0)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf.stat().st_size == stat.st_size
    assert cache_key(gguf, torch.float32, "none").file_hash != before.file_hash


def test_the_key_covers_dtype_and_quantization(gguf: Path) -> None:
    keys = {cache_key(gguf, d, q).file_name for d in (torch.float32, torch.bfloat16) for q in ("none", "int8", "auto")}
    assert len(keys) == 6
    assert cache_key(gguf, torch.float32, "none") == cache_key(gguf, torch.float32, "none")


def test_a_damaged_entry_is_a_miss_and_is_written_again(gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = logits(load_model(gguf, torch.float32, quantization="int4", cache_dir=cache))
    (entry,) = (cache / "weights").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    assert torch.equal(logits(load_model(gguf, torch.float32, quantization="int4", cache_dir=cache)), expected)
    assert load_cached(cache, cache_key(gguf, torch.float32, "int4")) is not None


def test_an_unwritable_cache_still_loads_the_model(gguf: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    model = load_model(gguf, torch.float32, quantization="int4", cache_dir=blocker)
    assert torch.equal(logits(model), logits(load_model(gguf, torch.float32, quantization="int4")))


def test_an_unknown_quantization_fails_before_loading(gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int2"):
        load_model(gguf, torch.float32, quantization="int2", cache_dir=tmp_path)
    assert not (tmp_path / "weights").exists()
