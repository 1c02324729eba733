"""Work the platform tests run in other processes: `in_processes(fn, calls)` starts one Python
process per call (plain subprocesses importing only this module: no pytest in them), runs them
together, and returns their results in order."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from loom.platform import ledger
from loom.platform.limits import RateLimiter
from loom.platform.store import Database
from loom.platform.types import Estimate, Held, Principal, RateLimited


def place_holds(url: str, account_id: int, hold_ids: list[str], estimate: dict[str, Any]) -> list[str]:
    """Places each hold from its own thread; returns the ids that were granted."""
    db = Database(url)
    who = Principal(account_id=account_id, account_name="race")
    try:
        with ThreadPoolExecutor(max_workers=len(hold_ids)) as pool:
            results = list(pool.map(lambda hold_id: ledger.hold(db, hold_id, who, Estimate(**estimate)), hold_ids))
    finally:
        db.dispose()
    return [r.hold_id for r in results if isinstance(r, Held)]


def hit_requests(redis_url: str, scope: str, key_id: int, rpm: int, num_hits: int) -> int:
    """Fires `num_hits` one-request hits at one key's RPM window; returns how many were allowed."""
    limiter = RateLimiter(redis_url, scope=scope)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: limiter.hit("requests", key_id, rpm, 1), range(num_hits)))
    return sum(1 for r in results if not isinstance(r, RateLimited))


WORKERS = {"place_holds": place_holds, "hit_requests": hit_requests}


def in_processes(name: str, calls: list[list[Any]], timeout_s: float = 60.0) -> list[Any]:
    procs = [
        subprocess.Popen([sys.executable, __file__, name, json.dumps(args)], stdout=subprocess.PIPE, text=True)
        for args in calls
    ]
    outputs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    return [json.loads(out) for out in outputs]


def estimate_args(estimate: Estimate) -> dict[str, Any]:
    return asdict(estimate)


if __name__ == "__main__":
    print(json.dumps(WORKERS[sys.argv[1]](*json.loads(sys.argv[2]))))
