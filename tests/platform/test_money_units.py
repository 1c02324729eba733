"""Dollar text <-> integer micro-dollars, and the cost formula (no database)."""

from __future__ import annotations

import pytest

from loom.platform.money import Price, format_usd, parse_usd, token_cost, worst_case_cost


@pytest.mark.parametrize(
    ("text", "micros"),
    [("12.5", 12_500_000), ("0.000001", 1), ("0", 0), (" 3 ", 3_000_000), ("1e-6", 1), ("1000000000", 10**15)],
)
def test_usd_text_becomes_exact_micros(text: str, micros: int) -> None:
    assert parse_usd(text) == micros
    assert parse_usd(format_usd(micros)) == micros


@pytest.mark.parametrize("text", ["0.0000001", "-1", "nan", "inf", "abc", "", "1000000001"])
def test_usd_text_that_needs_rounding_or_is_not_an_amount_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_usd(text)


def test_cost_rounds_up_once_per_request() -> None:
    price = Price(input_micros=150_000, cached_input_micros=75_000, output_micros=600_000)  # $0.15 / $0.075 / $0.60
    # 1000 prompt tokens (400 cached) and 10 output tokens: 600*0.15 + 400*0.075 + 10*0.6 = 126 micros
    assert token_cost(price, 1000, 400, 10) == 90 + 30 + 6
    assert token_cost(price, 1, 0, 0) == 1  # 0.15 micro-dollars still costs one
    assert token_cost(price, 0, 0, 0) == 0


def test_worst_case_never_below_any_actual_cost() -> None:
    price = Price(input_micros=100_000, cached_input_micros=300_000, output_micros=700_000)  # cached dearer
    worst = worst_case_cost(price, 500, 64)
    for cached in (0, 250, 500):
        for out in (0, 1, 64):
            assert token_cost(price, 500, cached, out) <= worst


def test_cache_salt_separates_accounts_and_keeps_the_requests_own() -> None:
    from loom.platform import Principal

    a, b = Principal(1, "a"), Principal(2, "b")
    assert a.cache_salt() != b.cache_salt()
    assert a.cache_salt("x") != b.cache_salt("x") != a.cache_salt()
    assert a.cache_salt("x") == Principal(1, "a", key_id=9).cache_salt("x")  # every key of one account shares it
