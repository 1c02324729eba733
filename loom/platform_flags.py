"""The platform's flags on `loom serve` and the admin commands, apart from `platform_cli` so that
building the argument parser imports neither the database layer nor the web stack."""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The platform's flags on `loom serve`."""
    group = parser.add_argument_group("platform (keys, billing, limits)")
    db_argument(group)
    group.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="keep rate-limit counters in Redis, shared by every server on it (default: in-process)",
    )
    group.add_argument(
        "--jwt-secret",
        default=None,
        help="accept HS256 JWTs in the `token` header signed with this secret (or set LOOM_JWT_SECRET)",
    )
    group.add_argument(
        "--jwt-public-key",
        default=None,
        metavar="FILE",
        help="accept RS256 JWTs in the `token` header verified with this PEM public key",
    )
    group.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback address while no API key exists (or with --no-platform)",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="answer 503 while this many requests wait for the engine (default: no limit)",
    )
    group.add_argument(
        "--no-platform",
        action="store_true",
        help="no database at all: no keys, billing, rate limits, overload limit or usage ledger (every request is anonymous)",
    )


def db_argument(parser: Any) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="sqlite:///PATH, postgresql://USER@HOST:PORT/DB or a file path (default: LOOM_DB, else a SQLite file in the user data directory)",
    )
