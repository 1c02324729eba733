"""Money as integers: US dollars in and out of text, and the cost of a request's tokens.

Owns the one unit of the ledger (integer micro-dollars, `*_micros`), the decimal parsing of the
admin commands' dollar amounts, and the cost formula shared by the hold (worst case) and the
settlement (actual), so a settlement can never cost more than its hold for the same tokens.
Never touches the database and never uses floats: a float cannot hold 0.1 dollars exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per million tokens
MAX_USD = Decimal(1_000_000_000)  # far above any real amount; keeps every product inside int64


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in micro-dollars per million tokens."""

    input_micros: int
    cached_input_micros: int
    output_micros: int


FREE = Price(0, 0, 0)  # a model nobody priced costs nothing


def parse_usd(text: str, *, what: str = "amount") -> int:
    """`"12.5"` -> 12_500_000 micro-dollars. Refuses what would need rounding, signs and non-numbers."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{what} must be a decimal number of US dollars, e.g. 12.50") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{what} must be a non-negative decimal number of US dollars")
    if value > MAX_USD:
        raise ValueError(f"{what} must be at most {MAX_USD} US dollars")
    micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{what} has more than 6 decimal places (the ledger counts micro-dollars)")
    return int(micros)


def format_usd(micros: int) -> str:
    """12_500_000 -> "12.500000" (exact, six decimals)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def token_cost(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
    """Micro-dollars for one request, rounded up to the next micro-dollar.

    `cached_tokens` are the part of `prompt_tokens` served from the prefix cache, billed at the
    cached price. Rounding once per request (not per token) keeps the sum exact.
    """
    cached = min(cached_tokens, prompt_tokens)
    scaled = (
        (prompt_tokens - cached) * price.input_micros
        + cached * price.cached_input_micros
        + completion_tokens * price.output_micros
    )
    return -(-scaled // TOKENS_PER_PRICE_UNIT)


def worst_case_cost(price: Price, prompt_tokens: int, max_completion_tokens: int) -> int:
    """The hold: every prompt token at the dearer of the two input prices, every possible output token.

    At admission nobody knows how much of the prompt the cache will serve, so a cheaper cached
    price must not make the hold smaller than the settlement.
    """
    dearest_input = max(price.input_micros, price.cached_input_micros)
    return token_cost(Price(dearest_input, dearest_input, price.output_micros), prompt_tokens, 0, max_completion_tokens)
