"""The operator's commands: `loom keys`, `loom credits`, `loom prices`, `loom usage`, `loom db`;
and what `loom serve` makes of its platform flags (declared in `platform_flags`).

Each admin command opens the database named by `--db URL` (else `LOOM_DB`, else the default
SQLite file), applies pending migrations, does one thing and exits 0, or prints `loom: error: ...`
to stderr and exits 1 (2 for usage errors). `loom keys create` prints the new key as the last
line of stdout: the only time it is ever shown. Never starts a server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from loom.platform import keys, ledger, usage
from loom.platform.money import Price, format_usd, parse_usd
from loom.platform.service import Platform, PlatformConfig
from loom.platform.store import Database, describe
from loom.platform_flags import db_argument

ADMIN_COMMANDS = ("keys", "credits", "prices", "usage", "db")


def admin_main(argv: list[str]) -> int:
    """Runs one admin command, e.g. `["keys", "create", "--account", "acme"]`. Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        db = Database(args.db)
    except Exception as exc:  # a malformed URL or a missing driver: say so, without a traceback
        return _fail(f"cannot open the database: {exc}")
    try:
        db.upgrade()
        args.run(db, args)
    except (ValueError, LookupError) as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    return 0


# ---- loom serve ------------------------------------------------------------------------------


def platform_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Platform | None:
    """Opens the platform `loom serve` was asked for (migrating the database); None with
    `--no-platform`. Raises ValueError / ConnectionError with a message fit for `loom: error: ...`."""
    import os

    env = os.environ if environ is None else environ
    if args.no_platform:
        platform_flags = ("db", "redis", "jwt_secret", "jwt_public_key", "max_queued_requests")
        given = [f"--{name.replace('_', '-')}" for name in platform_flags if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--no-platform runs without the platform, so {', '.join(given)} would be ignored")
        return None
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ValueError("--max-queued-requests must be at least 1")
    config = PlatformConfig(
        db_url=args.db,
        redis_url=args.redis,
        jwt_secret=args.jwt_secret or env.get("LOOM_JWT_SECRET") or None,
        jwt_public_key_file=args.jwt_public_key,
        max_queued_requests=args.max_queued_requests,
    )
    return Platform(config)


def unauthenticated_bind_error(platform: Platform | None, host: str, allow_unauthenticated: bool) -> str | None:
    """Why `loom serve` must not start: open (no platform, or no key and no JWT) on a non-loopback address."""
    if allow_unauthenticated or is_loopback(host) or (platform is not None and not platform.auth.is_open()):
        return None
    if platform is None:
        return f"--no-platform needs no credential, so anyone reaching {host} could use this server; pass --allow-unauthenticated"
    return (
        f"no API key exists, so anyone reaching {host} could use this server; create one with "
        "`loom keys create --account NAME`, or pass --allow-unauthenticated"
    )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def startup_description(platform: Platform | None, host: str) -> str:
    """The platform's part of `loom serve`'s ready line: where the data lives, who may call."""
    if platform is None:
        text = "platform off (--no-platform): no keys, billing or limits"
        return text if is_loopback(host) else f"{text}, UNAUTHENTICATED on {host} (--allow-unauthenticated)"
    text = platform.describe()
    if platform.auth.is_open() and not is_loopback(host):
        text += f", UNAUTHENTICATED on {host} (--allow-unauthenticated)"
    if platform.config.max_queued_requests is not None:
        text += f", 503 past {platform.config.max_queued_requests} queued requests"
    return text


# ---- the commands --------------------------------------------------------------------------


def _keys_create(db: Database, args: argparse.Namespace) -> None:
    models = args.models.split(",") if args.models is not None else None
    key, info = keys.create_key(db, args.account, name=args.name, rpm=args.rpm, tpm=args.tpm, models=models)
    print(f"created key {info.prefix}... for account {info.account} (store it now: it is not shown again)")
    print(key)


def _keys_list(db: Database, args: argparse.Namespace) -> None:
    rows = [
        [k.prefix, k.account, k.name or "", _opt(k.rpm), _opt(k.tpm), ",".join(k.models) if k.models else "*",
         _when(k.created_at), _when(k.revoked_at) if k.revoked_at else ""]
        for k in keys.list_keys(db, args.account)
    ]  # fmt: skip
    _table(["prefix", "account", "name", "rpm", "tpm", "models", "created", "revoked"], rows)


def _keys_revoke(db: Database, args: argparse.Namespace) -> None:
    info = keys.revoke_key(db, args.key)
    print(f"revoked {info.prefix}... of account {info.account}")


def _credits_add(db: Database, args: argparse.Namespace) -> None:
    amount = parse_usd(args.amount, what="AMOUNT")
    account = ledger.add_credit(db, args.account, amount)
    print(f"added ${format_usd(amount)} to {account.name}: balance ${format_usd(account.balance_micros)}")


def _credits_show(db: Database, args: argparse.Namespace) -> None:
    account = ledger.find_account(db, args.account)
    if account is None:
        raise LookupError(f"no account named {args.account!r}")
    print(f"account  {account.name}")
    print(f"balance  ${format_usd(account.balance_micros)}")
    print(f"held     ${format_usd(account.held_micros)}  (reserved by requests in flight)")
    print(f"spent    ${format_usd(usage.spent(db, account.id))}")


def _prices_set(db: Database, args: argparse.Namespace) -> None:
    price = Price(
        parse_usd(args.input, what="--input"),
        parse_usd(args.cached_input, what="--cached-input"),
        parse_usd(args.output, what="--output"),
    )
    ledger.set_price(db, args.model, price)
    print(f"{args.model}: {_price_text(price)} per 1M tokens")


def _prices_list(db: Database, args: argparse.Namespace) -> None:
    rows = [
        [model, format_usd(p.input_micros), format_usd(p.cached_input_micros), format_usd(p.output_micros), _when(at)]
        for model, p, at in ledger.list_prices(db)
    ]
    _table(["model", "input $/1M", "cached input $/1M", "output $/1M", "updated"], rows)


def _usage(db: Database, args: argparse.Namespace) -> None:
    since = _parse_since(args.since) if args.since else None
    lines = usage.summary(db, account=args.account, since=since)
    if args.json:
        out = [{**_as_dict(line), "cost_usd": format_usd(line.cost_micros)} for line in lines]
        print(json.dumps(out, indent=2))
        return
    rows = [
        [u.account, u.key_prefix or "(jwt)", u.model, str(u.requests), str(u.prompt_tokens), str(u.cached_tokens),
         str(u.completion_tokens), format_usd(u.cost_micros)]
        for u in lines
    ]  # fmt: skip
    _table(["account", "key", "model", "requests", "prompt", "cached", "completion", "cost $"], rows)


def _db_upgrade(db: Database, args: argparse.Namespace) -> None:
    print(f"{describe(db.url)}: at revision {db.current_revision()}")


# ---- parsing ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Loom's provider administration.")
    groups = parser.add_subparsers(dest="group", required=True)
    k = _group(groups, "keys", "API keys")
    _command(k, "create", "mint a key (creates the account if needed); the key is the last line printed", _keys_create, [
        (("--account",), {"required": True}), (("--rpm",), {"type": int}), (("--tpm",), {"type": int}),
        (("--models",), {"metavar": "M1,M2", "help": "models the key may use (default: all)"}),
        (("--name",), {"metavar": "LABEL"}),
    ])  # fmt: skip
    _command(k, "list", "list keys (never the secret)", _keys_list, [(("--account",), {})])
    _command(
        k,
        "revoke",
        "revoke a key, given whole or by its listed prefix",
        _keys_revoke,
        [(("key",), {"metavar": "KEY_OR_PREFIX"})],
    )
    c = _group(groups, "credits", "account balances")
    _command(c, "add", "add US dollars to an account (creates it if needed)", _credits_add, [
        (("--account",), {"required": True}), (("amount",), {"metavar": "AMOUNT", "help": "US dollars, e.g. 25.00"}),
    ])  # fmt: skip
    _command(c, "show", "show an account's balance", _credits_show, [(("--account",), {"required": True})])
    p = _group(groups, "prices", "model prices (US dollars per 1M tokens)")
    _command(p, "set", "set a model's price", _prices_set, [
        (("model",), {"metavar": "MODEL"}), (("--input",), {"required": True, "metavar": "USD_PER_1M"}),
        (("--cached-input",), {"required": True, "metavar": "USD_PER_1M"}),
        (("--output",), {"required": True, "metavar": "USD_PER_1M"}),
    ])  # fmt: skip
    _command(p, "list", "list prices", _prices_list, [])
    _command(groups, "usage", "usage per account, key and model", _usage, [
        (("--account",), {}), (("--since",), {"metavar": "DATE", "help": "ISO date or time, UTC unless it says otherwise"}),
        (("--json",), {"action": "store_true"}),
    ])  # fmt: skip
    d = _group(groups, "db", "the platform database")
    _command(d, "upgrade", "apply pending migrations", _db_upgrade, [])
    return parser


def _group(groups: Any, name: str, help_text: str) -> Any:
    return groups.add_parser(name, help=help_text).add_subparsers(dest="command", required=True)


def _command(
    sub: Any, name: str, help_text: str, run: Callable[[Database, argparse.Namespace], None], arguments: list[Any]
) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    for flags, options in arguments:
        p.add_argument(*flags, **options)
    db_argument(p)
    p.set_defaults(run=run)


def _parse_since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since must be an ISO date or time, e.g. 2025-01-31 (got {text!r})") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# ---- output ----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _as_dict(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") if at is not None else ""


def _price_text(p: Price) -> str:
    return f"input ${format_usd(p.input_micros)}, cached input ${format_usd(p.cached_input_micros)}, output ${format_usd(p.output_micros)}"


def _fail(message: str) -> int:
    print(f"loom: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(admin_main(sys.argv[1:]))
