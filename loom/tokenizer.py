"""One tokenizer protocol over Hugging Face fast tokenizers, loaded from a HF folder or GGUF metadata.

Owns text <-> token ids and the chat template string. Never renders templates (serving does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    eos_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    vocab_size: int
    all_special_ids: frozenset[int]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...


class HFTokenizer:
    """Wraps a `transformers` fast tokenizer; decoding goes straight to the Rust backend for speed."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token: str | None = hf_tokenizer.bos_token
        self.eos_token: str | None = hf_tokenizer.eos_token
        self.vocab_size: int = len(hf_tokenizer)
        self.all_special_ids = frozenset(hf_tokenizer.all_special_ids)
        self.chat_template: str | None = hf_tokenizer.chat_template

    @property
    def hf(self) -> Any:
        return self._hf

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        return str(self._backend.id_to_token(token_id))


def load_tokenizer(model_path: str | os.PathLike[str]) -> HFTokenizer:
    """Loads the tokenizer that ships with the weights: a GGUF file's metadata or a HF folder."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        hf = AutoTokenizer.from_pretrained(str(path))
    return HFTokenizer(hf)
