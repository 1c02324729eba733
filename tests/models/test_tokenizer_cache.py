"""A GGUF file's tokenizer, cached: the same ids, text, special tokens and chat template as the one
`transformers` converts, loaded without importing `transformers` (the slow part of start-up)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loom.tokenizer import HFTokenizer, _cache_file, load_tokenizer

TEXTS = [
    "Hello world",
    "<|im_start|>user\n  two spaces\t\ttabs<|im_end|>\n",
    "é 漢字 🤖 — 'quotes' \"and\" <|endoftext|>",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <|im_end|> there"},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loom-cache")


@pytest.fixture(scope="module")
def converted_and_cached(model_path: Path, cache_dir: Path) -> tuple[HFTokenizer, HFTokenizer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOM_CACHE_DIR", str(cache_dir))
        converted = load_tokenizer(model_path)
        cached = load_tokenizer(model_path)
    return converted, cached


def test_first_load_writes_one_entry_the_second_reads_it(
    converted_and_cached: tuple[HFTokenizer, HFTokenizer], cache_dir: Path
) -> None:
    converted, cached = converted_and_cached
    assert len(list((cache_dir / "tokenizers").glob("*.json"))) == 1
    assert converted._saved is None and cached._saved is not None  # converted by transformers, then read back


def test_cached_tokenizer_encodes_decodes_and_names_special_tokens_the_same(
    converted_and_cached: tuple[HFTokenizer, HFTokenizer],
) -> None:
    converted, cached = converted_and_cached
    for attr in ("eos_token_id", "bos_token", "eos_token", "vocab_size", "all_special_ids", "chat_template"):
        assert getattr(cached, attr) == getattr(converted, attr), attr
    for text in TEXTS:
        ids = converted.encode(text)
        assert cached.encode(text) == ids
        assert cached.encode(text, add_special_tokens=True) == converted.encode(text, add_special_tokens=True)
        assert cached.decode(ids) == converted.decode(ids)
        assert cached.decode(ids, skip_special_tokens=True) == converted.decode(ids, skip_special_tokens=True)
    assert [cached.id_to_token(i) for i in range(0, 49152, 997)] == [
        converted.id_to_token(i) for i in range(0, 49152, 997)
    ]


def test_cached_tokenizers_transformers_twin_renders_the_chat_template_the_same(
    converted_and_cached: tuple[HFTokenizer, HFTokenizer],
) -> None:
    converted, cached = converted_and_cached
    for add in (True, False):
        kwargs = {"add_generation_prompt": add, "tokenize": False}
        assert cached.hf.apply_chat_template(CONVERSATION, **kwargs) == converted.hf.apply_chat_template(
            CONVERSATION, **kwargs
        )
    assert cached.hf.all_special_ids == converted.hf.all_special_ids
    assert cached.hf.special_tokens_map == converted.hf.special_tokens_map
    assert len(cached.hf) == len(converted.hf)


def test_a_cached_tokenizer_loads_without_importing_transformers(
    model_path: Path, cache_dir: Path, converted_and_cached: tuple[HFTokenizer, HFTokenizer]
) -> None:
    code = (
        "import sys; from loom.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({str(model_path)!r}); "
        "print(t.encode('Hello world'), 'transformers' in sys.modules)"
    )
    env = {**os.environ, "LOOM_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ids, imported = out.stdout.rsplit(" ", 1)
    assert json.loads(ids) == converted_and_cached[0].encode("Hello world")
    assert imported.strip() == "False"


def test_the_entry_is_keyed_by_the_files_state(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / model_path.name
    shutil.copyfile(model_path, copy)
    before = _cache_file(tmp_path, copy)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 1_000_000_000))
    after = _cache_file(tmp_path, copy)
    assert before != after
    assert before.name.split(".")[:2] == after.name.split(".")[:2]  # same source: the old entry gets replaced


def test_cached_tokenizer_hands_llguidance_the_same_tokenizer_json(
    converted_and_cached: tuple[HFTokenizer, HFTokenizer],
) -> None:
    converted, cached = converted_and_cached
    # the cached one returns its saved text instead of serializing again: the same tokenizer either way
    assert cached.backend_json() == cached._saved["tokenizer"]  # type: ignore[index]
    assert json.loads(cached.backend_json()) == json.loads(converted.backend_json())
    padded = HFTokenizer.from_saved(cached.saved())
    padded._backend.enable_padding(length=8)
    assert json.loads(padded.backend_json())["padding"] is None  # padding set after loading is still switched off
