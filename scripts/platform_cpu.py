"""The platform's own CPU per request, alone: authenticate, count the rate limits, hold, settle
(with its usage row), one request after another on one thread, then 32 at a time.

Reports wall time and CPU time per request in this process and, on Linux, in the database's
own processes for the one-at-a-time run (every `postgres` process on the machine, so run it with
nothing else using that database). No model and no HTTP: this is the cost a server pays per request on top of its
generation, measured without the noise of a generation benchmark.

    .venv/bin/python scripts/platform_cpu.py --db postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loom.platform import (
    Admitted,
    Ending,
    Estimate,
    FinalUsage,
    Platform,
    PlatformConfig,
    Principal,
    RequestMeta,
    read_credential,
)
from loom.platform.keys import create_key
from loom.platform.ledger import add_credit, new_hold_id, set_price
from loom.platform.money import Price
from loom.platform.store import describe


def database_cpu_s() -> float:
    """CPU seconds used so far by every PostgreSQL process on this machine (0 where /proc is absent)."""
    total = 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/platform_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=None, metavar="URL", help="database URL (default: a new SQLite file)")
    p.add_argument("--requests", type=int, default=400, help="requests per measurement (default 400)")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        db_url = args.db or str(Path(tmp) / "loom.db")
        scope = uuid.uuid4().hex
        platform = Platform(PlatformConfig(db_url=db_url, limits_scope=scope))
        account = model = f"cpu-bench-{scope[:12]}"  # its own account and price, beside any others
        set_price(platform.db, model, Price(100_000, 50_000, 400_000))
        add_credit(platform.db, account, 10**12)
        key, _ = create_key(platform.db, account, rpm=10**6, tpm=10**9)  # limits counted, never reached
        credential = read_credential([f"Bearer {key}"], [], [])

        def one(_: int) -> None:
            who = platform.authenticate(credential)
            if not isinstance(who, Principal):
                raise RuntimeError(f"the benchmark's own key was refused: {who}")
            platform.limit_requests(who)
            admitted = platform.admit(who, Estimate(model, 130, 64, 1), new_hold_id(), RequestMeta())
            if not isinstance(admitted, Admitted):
                raise RuntimeError(f"the benchmark's request was refused: {admitted}")
            platform.finish(who, admitted, FinalUsage(130, 0, 64), Ending.OK, RequestMeta(), 10)

        for i in range(20):  # warm-up: connections, statement caches
            one(i)
        print(f"platform work per request on {describe(platform.db.url)}")
        for workers in (1, 32):
            cpu, db_cpu, wall = time.process_time(), database_cpu_s(), time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(args.requests)))
            cpu, db_cpu, wall = time.process_time() - cpu, database_cpu_s() - db_cpu, time.perf_counter() - wall
            per = 1000 / args.requests
            # at 32 at a time connections beyond the pool close, and their CPU leaves the count
            server = f"{db_cpu * per:.2f} ms" if workers == 1 else "not measured"
            print(
                f"  {workers:2d} at a time: wall {wall * per:.2f} ms, CPU here {cpu * per:.2f} ms, "
                f"CPU in the database server {server}  (load {os.getloadavg()[0]:.2f})"
            )
        platform.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
