"""The provider platform: API keys and JWTs, accounts and prices, balance holds and settlement,
per-key rate limits, overload admission and the usage ledger, over SQLite or PostgreSQL.

The API layer holds one `Platform` (see `service.py`) and maps its typed decisions to HTTP
answers. Token counts in, decisions out: this package never imports `loom.engine`,
`loom.serving` or `loom.api` (an import-linter contract checks it).
"""

from loom.platform.identity import Credential, read_credential
from loom.platform.service import Admitted, Platform, PlatformConfig
from loom.platform.types import (
    Ending,
    Estimate,
    FinalUsage,
    Held,
    Insufficient,
    Overloaded,
    Principal,
    RateLimited,
    Refused,
    RequestMeta,
    Settlement,
    UsageRecord,
    WindowState,
)

__all__ = [
    "Admitted",
    "Credential",
    "Ending",
    "Estimate",
    "FinalUsage",
    "Held",
    "Insufficient",
    "Overloaded",
    "Platform",
    "PlatformConfig",
    "Principal",
    "RateLimited",
    "Refused",
    "RequestMeta",
    "Settlement",
    "UsageRecord",
    "WindowState",
    "read_credential",
]
