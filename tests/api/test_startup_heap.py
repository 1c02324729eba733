"""`loom serve` starts with the cyclic collector off and a short GIL switch interval, then freezes
what start-up built (`gc.freeze`) and restores both; a failed start restores them too."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from loom.cli import _STARTUP_SWITCH_INTERVAL_S, _StartupHeap


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    interval = sys.getswitchinterval()
    yield
    gc.unfreeze()  # this test process keeps collecting what the tests before it made
    gc.enable()
    sys.setswitchinterval(interval)


def test_startup_freezes_its_objects_and_restores_the_collector() -> None:
    interval = sys.getswitchinterval()
    frozen_before = gc.get_freeze_count()
    with _StartupHeap() as heap:
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(_STARTUP_SWITCH_INTERVAL_S)
        built = [{"start-up": i} for i in range(1000)]
        heap.end()
        assert gc.isenabled() and sys.getswitchinterval() == interval
        assert gc.get_freeze_count() >= frozen_before + len(built)
        heap.end()  # once only: serving's own objects are never frozen
    assert gc.isenabled() and sys.getswitchinterval() == interval


def test_a_failed_startup_turns_the_collector_back_on_without_freezing() -> None:
    interval = sys.getswitchinterval()
    frozen_before = gc.get_freeze_count()
    with pytest.raises(RuntimeError), _StartupHeap():
        raise RuntimeError("the model did not load")
    assert gc.isenabled() and sys.getswitchinterval() == interval
    assert gc.get_freeze_count() == frozen_before
