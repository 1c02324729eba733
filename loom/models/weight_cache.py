"""On-disk cache of prepared weights: a restart skips parsing, dequantizing and quantizing a GGUF file.

Owns the cache key, the file layout and atomic writes. Never decides what is prepared (registry.py
and prepared.py do) and never serves an entry it cannot prove fresh: the key covers the GGUF file's
size, modification time and a hash of its first 8 MiB (the header: metadata and tensor table),
plus everything that changes the prepared tensors (dtype, quantization asked for, the dense dtype
this CPU computes in, the torch version, whose int4 packing is an opaque layout, and
`FORMAT_VERSION`). A file that fails to load or whose metadata does not match is a miss.

Layout: `<cache_dir>/weights/<stem>.<path hash>.<file hash>.<variant>.safetensors`, the config and
method names in the safetensors metadata. Writing one entry removes the same path's entries with an
older file hash (the file changed; they can never be read again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loom.models.config import ModelConfig
from loom.models.linear import dense_dtype
from loom.models.prepared import PreparedWeights

FORMAT_VERSION = 3  # bump when prepared tensors change meaning for the same inputs
HEADER_BYTES = 8 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheKey:
    source_id: str  # `<stem>.<hash of the resolved path>`: one model file
    file_hash: str  # size, mtime and header hash of that file now
    variant: str  # what was prepared from it

    @property
    def file_name(self) -> str:
        return f"{self.source_id}.{self.file_hash}.{self.variant}.safetensors"


def cache_key(path: Path, dtype: torch.dtype, quantization: str) -> CacheKey:
    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with resolved.open("rb") as f:
        digest.update(f.read(HEADER_BYTES))
    path_hash = hashlib.blake2b(str(resolved).encode(), digest_size=4).hexdigest()
    dense = str(dense_dtype(dtype)).removeprefix("torch.")
    variant_text = (
        f"{str(dtype).removeprefix('torch.')}-{quantization}-{dense}-torch{torch.__version__}-v{FORMAT_VERSION}"
    )
    variant = hashlib.blake2b(variant_text.encode(), digest_size=6).hexdigest()
    return CacheKey(f"{_safe_stem(resolved)}.{path_hash}", digest.hexdigest(), variant)


def load_cached(cache_dir: Path, key: CacheKey) -> PreparedWeights | None:
    path = cache_dir / "weights" / key.file_name
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key.file_name:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
        config = ModelConfig(**json.loads(meta["config"]))
        return PreparedWeights(config, meta["quantization"], meta["head_quantization"], tensors)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable weight cache entry %s: %s", path, exc)
        return None


def save_cached(cache_dir: Path, key: CacheKey, weights: PreparedWeights) -> Path | None:
    """Writes the entry atomically (temp file, then rename); returns its path, None if the cache is not writable."""
    folder = cache_dir / "weights"
    target = folder / key.file_name
    metadata = {
        "key": key.file_name,
        "config": json.dumps(dataclasses.asdict(weights.config)),
        "quantization": weights.quantization,
        "head_quantization": weights.head_quantization,
    }
    tmp = folder / f".{key.file_name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in weights.tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("not caching prepared weights in %s: %s", folder, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return None
    for old in folder.glob(f"{key.source_id}.*.safetensors"):
        if not old.name.startswith(f"{key.source_id}.{key.file_hash}."):
            old.unlink(missing_ok=True)
    return target


def _safe_stem(path: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:64] or "model"
