"""The platform's `loom serve` flags: parsing, opening the platform, and the loopback rule."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from loom.platform.keys import create_key
from loom.platform_cli import platform_from_args, unauthenticated_bind_error
from loom.platform_flags import add_serve_arguments


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_an_open_platform_binds_only_loopback_unless_allowed(db_url: str) -> None:
    platform = platform_from_args(_args("--db", db_url), environ={})
    try:
        assert "open" in platform.describe()
        assert unauthenticated_bind_error(platform, "127.0.0.1", False) is None
        assert "--allow-unauthenticated" in (unauthenticated_bind_error(platform, "0.0.0.0", False) or "")
        assert unauthenticated_bind_error(platform, "0.0.0.0", True) is None
        create_key(platform.db, "acme")
        assert unauthenticated_bind_error(platform, "0.0.0.0", False) is None
        assert "API keys required" in platform.describe()
    finally:
        platform.close()


def test_jwt_secret_from_the_environment_and_bad_flags(db_url: str) -> None:
    platform = platform_from_args(_args("--db", db_url), environ={"LOOM_JWT_SECRET": "k" * 32})
    try:
        assert "HS256 JWT" in platform.describe() and not platform.auth.is_open()
    finally:
        platform.close()
    with pytest.raises(ValueError, match="max-queued-requests"):
        platform_from_args(_args("--db", db_url, "--max-queued-requests", "0"), environ={})
    with pytest.raises(ValueError, match="public key"):
        platform_from_args(_args("--db", db_url, "--jwt-public-key", "/nonexistent.pem"), environ={})
    with pytest.raises(ConnectionError, match="Redis"):
        platform_from_args(_args("--db", db_url, "--redis", "redis://127.0.0.1:1"), environ={})


def test_loom_serve_refuses_an_open_public_bind_before_loading_the_model(tmp_path: Path) -> None:
    """No key yet (or no platform at all) on 0.0.0.0: `loom serve` exits 2 at once, saying why."""
    db = f"sqlite:///{tmp_path / 'loom.db'}"
    for flags in (["--db", db], ["--no-platform"]):
        cmd = [sys.executable, "-m", "loom.cli", "serve", "--host", "0.0.0.0", "--port", "9", *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, done.stderr
        assert "--allow-unauthenticated" in done.stderr and "loading" not in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli", "serve", "--no-platform", "--db", db],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--db would be ignored" in done.stderr
