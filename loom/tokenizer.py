"""One tokenizer protocol over Hugging Face fast tokenizers, loaded from a HF folder or GGUF metadata.

Owns text <-> token ids and the chat template string. Never renders templates (serving does).

Converting a GGUF file's vocabulary to a fast tokenizer takes `transformers` seconds (it parses the
whole file in Python), so the result is cached: the `tokenizers` JSON plus the special tokens,
chat template and init options, under `<cache dir>/tokenizers/`, keyed by the file's size,
modification time, a hash of its first 8 MiB (its metadata) and the converter's versions. A cached
tokenizer needs only the `tokenizers` library; its `transformers` twin (`.hf`) is built on first use.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

_CACHE_FORMAT = 1
_HEADER_BYTES = 8 << 20
_INIT_KEYS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")

log = logging.getLogger(__name__)


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
    """A fast tokenizer; decoding goes straight to the Rust backend for speed.

    Built from a `transformers` tokenizer, or from a saved description (`from_saved`), in which
    case the `transformers` tokenizer behind `.hf` is created only when something asks for it.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf: Any | None = hf_tokenizer
        self._saved: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._backend = hf_tokenizer.backend_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token: str | None = hf_tokenizer.bos_token
        self.eos_token: str | None = hf_tokenizer.eos_token
        self.vocab_size: int = len(hf_tokenizer)
        self.all_special_ids = frozenset(hf_tokenizer.all_special_ids)
        self.chat_template: str | None = hf_tokenizer.chat_template

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> HFTokenizer:
        from tokenizers import Tokenizer as Backend

        tok = cls.__new__(cls)
        tok._hf, tok._saved, tok._lock = None, saved, threading.Lock()
        tok._backend = Backend.from_str(saved["tokenizer"])
        tok.eos_token_id = saved["eos_token_id"]
        tok.bos_token = saved["special_tokens"].get("bos_token")
        tok.eos_token = saved["special_tokens"].get("eos_token")
        tok.vocab_size = int(saved["vocab_size"])
        tok.all_special_ids = frozenset(saved["all_special_ids"])
        tok.chat_template = saved["chat_template"]
        return tok

    def saved(self) -> dict[str, Any]:
        """Everything `from_saved` needs to rebuild this tokenizer without `transformers`."""
        if self._saved is not None:
            return self._saved
        hf = self.hf
        return {
            "tokenizer": self._backend.to_str(),
            "special_tokens": dict(hf.special_tokens_map),
            "init": {k: hf.init_kwargs[k] for k in _INIT_KEYS if k in hf.init_kwargs},
            "chat_template": self.chat_template,
            "eos_token_id": self.eos_token_id,
            "vocab_size": self.vocab_size,
            "all_special_ids": sorted(self.all_special_ids),
        }

    def backend_json(self) -> str:
        """The Rust tokenizer as JSON, padding and truncation off (what llguidance builds from)."""
        if self._saved is not None and self._backend.padding is None and self._backend.truncation is None:
            return str(self._saved["tokenizer"])  # what `to_str` would write again: 0.35 s of a start-up saved
        backend = copy.copy(self._backend)
        backend.no_padding()
        backend.no_truncation()
        return str(backend.to_str())

    @property
    def hf(self) -> Any:
        with self._lock:
            if self._hf is None:
                assert self._saved is not None
                self._hf = _hf_from_saved(self._saved)
            return self._hf

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        return str(self._backend.id_to_token(token_id))


def load_tokenizer(model_path: str | os.PathLike[str]) -> HFTokenizer:
    """Loads the tokenizer that ships with the weights: a GGUF file's metadata or a HF folder.

    A GGUF file's tokenizer is read from and written to the cache in `default_cache_dir()`.
    """
    path = Path(model_path)
    if not (path.is_file() and path.suffix == ".gguf"):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
    folder = default_cache_dir()
    cached = _cache_file(folder, path) if folder is not None else None
    if cached is not None and cached.is_file():
        try:
            return HFTokenizer.from_saved(json.loads(cached.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is a miss
            log.warning("ignoring unreadable tokenizer cache entry %s: %s", cached, exc)
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    if cached is not None:
        _write_atomically(cached, json.dumps(tok.saved()))
    return tok


def default_cache_dir() -> Path | None:
    """`$LOOM_CACHE_DIR` (empty: no cache), else the user cache directory (`~/.cache/loom` on Linux)."""
    configured = os.environ.get("LOOM_CACHE_DIR")
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("loom"))


def _hf_from_saved(saved: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Backend.from_str(saved["tokenizer"]),
        chat_template=saved["chat_template"],
        **saved["special_tokens"],
        **saved["init"],
    )


def _cache_file(folder: Path, path: Path) -> Path:
    """`<folder>/tokenizers/<stem>.<path hash>.<file and converter hash>.json`."""
    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    digest = hashlib.blake2b(digest_size=16)
    converter = f"{version('transformers')}:{version('tokenizers')}:{_CACHE_FORMAT}"
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{converter}:".encode())
    with resolved.open("rb") as f:
        digest.update(f.read(_HEADER_BYTES))
    path_hash = hashlib.blake2b(str(resolved).encode(), digest_size=4).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in resolved.stem)[:64]
    return folder / "tokenizers" / f"{stem}.{path_hash}.{digest.hexdigest()}.json"


def _write_atomically(target: Path, text: str) -> None:
    """Temp file then rename, so a reader never sees half an entry; drops the same model's stale entries."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("not caching the tokenizer in %s: %s", target.parent, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return
    source_id = target.name.rsplit(".", 2)[0]  # `<stem>.<path hash>`
    for old in target.parent.glob(f"{source_id}.*.json"):
        if old != target:
            old.unlink(missing_ok=True)
