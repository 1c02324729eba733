"""Kernel timings are taken once per machine when a store is configured, and every time without one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.models import timing


@pytest.fixture(autouse=True)
def _no_store_after() -> Iterator[None]:
    yield
    timing.keep_choices(None)


class Measure:
    def __init__(self, answer: bool | int) -> None:
        self.answer, self.calls = answer, 0

    def __call__(self) -> bool | int:
        self.calls += 1
        return self.answer


def test_without_a_store_every_question_is_measured() -> None:
    timing.keep_choices(None)
    measure = Measure(7)
    assert [timing.measured("q", measure) for _ in range(2)] == [7, 7]
    assert measure.calls == 2


def test_a_kept_answer_is_read_back_without_measuring_or_waiting(tmp_path: Path) -> None:
    waits: list[str] = []
    timing.keep_choices(tmp_path, lambda: waits.append("waited"))
    first = Measure(True)
    assert timing.measured("does a win", first) is True
    assert (first.calls, waits) == (1, ["waited"])  # a miss waits for quiet, then measures
    timing.keep_choices(tmp_path, lambda: waits.append("waited"))  # as a restarted server would
    again = Measure(False)
    assert timing.measured("does a win", again) is True
    assert (again.calls, waits) == (0, ["waited"])
    other = Measure(4)
    assert timing.measured("how many rows", other) == 4 and other.calls == 1
    kept = json.loads((tmp_path / timing.STORE_FILE).read_text())
    assert sorted(kept.values(), key=str) == [4, True]
    assert all(timing.machine_fingerprint() in key for key in kept)


def test_another_machine_or_a_broken_file_is_measured_again(tmp_path: Path) -> None:
    store = tmp_path / timing.STORE_FILE
    store.write_text(json.dumps({"q on some other machine": 3}))
    timing.keep_choices(tmp_path)
    measure = Measure(5)
    assert timing.measured("q", measure) == 5 and measure.calls == 1
    store.write_text("{not json")
    assert timing.measured("q", measure) == 5 and measure.calls == 2
    assert json.loads(store.read_text())  # rewritten whole


def test_an_unwritable_store_still_answers(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    timing.keep_choices(blocker / "cache")  # a directory under a file cannot be made
    assert timing.measured("q", Measure(2)) == 2


def test_the_cli_parser_imports_neither_torch_nor_the_web_stack() -> None:
    """`loom serve` imports torch once it starts loading the model, and the web stack while it loads."""
    code = "import sys, loom.cli; print(sorted(m for m in ('torch', 'fastapi', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
