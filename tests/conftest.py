"""Fixtures shared across the test tree: the default model's path and a one-thread torch scope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loom.models.default import default_model_path


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model; the README's commands install it, so its absence is a failure, not a skip."""
    return default_model_path()


@pytest.fixture(scope="session", autouse=True)
def _platform_database_is_temporary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`loom serve` and the admin commands open `LOOM_DB` when no `--db` is given: in tests a
    temporary file (inherited by server processes), never the developer's own database."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LOOM_DB", str(tmp_path_factory.mktemp("loom-db") / "loom.db"))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """Tiny models on a busy 2-core machine: extra OpenMP threads make every op wait (up to 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
