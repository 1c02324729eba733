"""The step loop's malloc settings are accepted by the C library they are written for."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_step_loop_malloc_settings() -> None:
    # a fresh process: mallopt changes the whole process
    code = "from loom.engine.host_memory import keep_freed_memory; print(keep_freed_memory())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "True", run.stderr
