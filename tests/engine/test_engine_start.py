"""`begin_engine` builds the model on the engine's thread while its caller works, and times no
kernel until the caller says it is quiet; the second start on a machine times none at all."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.engine.config import EngineConfig
from loom.engine.factory import begin_engine
from loom.models import timing


@pytest.fixture(autouse=True)
def _no_store_after() -> Iterator[None]:
    yield
    timing.keep_choices(None)


def _config(model_path: Path, cache_dir: Path) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_path),
        served_model_name="m",
        quantization="auto",
        kv_cache_gib=0.05,
        max_model_len=256,
        weight_cache_dir=cache_dir,
    )


def test_kernels_are_timed_only_once_the_caller_is_quiet_then_kept(model_path: Path, tmp_path: Path) -> None:
    quiet = threading.Event()
    engine = begin_engine(_config(model_path, tmp_path), quiet=quiet)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("weights/*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the weights are prepared and cached before the model is built
        assert not engine._ready.wait(timeout=1.0)  # built, then waiting to time the small-batch crossover
        assert not (tmp_path / timing.STORE_FILE).exists()
        quiet.set()
        engine.wait_core()
    finally:
        quiet.set()
        engine.shutdown()
    kept = json.loads((tmp_path / timing.STORE_FILE).read_text())
    assert any(key.startswith("most decode rows (of ") for key in kept)

    again = begin_engine(_config(model_path, tmp_path), quiet=threading.Event())  # never set: nothing to time
    try:
        again.wait_core()
    finally:
        again.shutdown()
