"""Kubernetes quantities and fractions: exact, strict, and errors that name field and value."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.util.quantity import (
    BINARY,
    DECIMAL,
    MAX_QUANTITY,
    InvalidValue,
    format_bytes,
    parse_fraction,
    parse_quantity,
    shown,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24Gi", 24 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1Ki", 1024),
        ("2Ei", 2 * 2**60),
        ("32G", 32 * 10**9),
        ("1k", 1000),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("12e-1", None),
        ("1.5Gi", 3 * 2**29),
        ("0.5Ki", 512),
        ("1073741824", 2**30),
        (1073741824, 2**30),
        ("+5Mi", 5 * 2**20),
        ("9223372036854775807", MAX_QUANTITY),
        ("5000m", 5),
        ("1000000000n", 1),
        ("2000000u", 2),
        ("1.", 1),
        (".5Ki", 512),
        ("1E", 10**18),
        ("1" + "0" * 40 + "e-31", 10**9),
        (2.0e9, 2 * 10**9),
    ],
)
def test_valid_quantities(text: str | int, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(InvalidValue, match="whole number of bytes"):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "24GB",
        "24gb",
        "-1Gi",
        "0",
        "0Gi",
        "",
        " ",
        "24 Gi",
        "NaN",
        "nan",
        "Inf",
        "-inf",
        "0.5",
        "1m",
        "1u",
        "9223372036854775808",
        "9Ei",
        "1e400",
        "Gi",
        "1.2.3Gi",
        "0x10",
        "1e-3",
        "1_000",
        "1e999999999",  # must answer at once, not build a billion-digit integer
        "1e-999999999",
        "0e999999999",
        "-0",
    ],
)
def test_invalid_quantities_name_the_field_and_value(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_quantity(text, "spec.hardware.memoryBudget")
    message = str(info.value)
    assert message.startswith("spec.hardware.memoryBudget: ") and shown(text) in message


def test_the_message_for_a_typo_says_what_to_write() -> None:
    with pytest.raises(InvalidValue) as info:
        parse_quantity("24GB", "memoryBudget")
    assert str(info.value) == (
        'memoryBudget: "24GB" is not a Kubernetes quantity '
        "(use binary Ki Mi Gi Ti Pi Ei or decimal k M G T P E, e.g. 24Gi)"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (True, "not a quantity"),
        (None, "not a quantity"),
        ([1], "not a quantity"),
        (1.5, "whole number of bytes"),
        (math.nan, "not finite"),
        (math.inf, "not finite"),
        (-1, "negative"),
        (0, "more than zero"),
        (2**63, "out of range"),
    ],
)
def test_non_string_values(value: object, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason):
        parse_quantity(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "reason"),
    [pytest.param("9" * 5000, "too long", id="long-text"), pytest.param(10**5000, "out of range", id="huge-int")],
)
def test_long_values_are_cut_short_in_messages(value: str | int, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason) as info:
        parse_quantity(value)
    assert len(str(info.value)) < 200


def test_zero_is_allowed_only_when_asked() -> None:
    assert parse_quantity("0", positive=False) == 0


SUFFIXES = {**BINARY, **DECIMAL}


@given(st.integers(min_value=1, max_value=2**40), st.sampled_from(sorted(SUFFIXES)))
def test_suffixes_multiply_exactly(n: int, suffix: str) -> None:
    expected = n * SUFFIXES[suffix]
    if expected > MAX_QUANTITY:
        with pytest.raises(InvalidValue, match="out of range"):
            parse_quantity(f"{n}{suffix}")
    else:
        assert parse_quantity(f"{n}{suffix}") == expected


@given(st.integers(min_value=1, max_value=MAX_QUANTITY))
def test_plain_integers_round_trip(n: int) -> None:
    assert parse_quantity(str(n)) == n == parse_quantity(n)


@given(
    st.one_of(
        st.text(max_size=30),
        st.from_regex(r"\A[+-]?[0-9]{0,25}\.?[0-9]{0,25}([eE][+-]?[0-9]{1,4}|Ki|Mi|Gi|Ti|Pi|Ei|[kMGTPEmun])?\Z"),
    )
)
def test_random_text_never_raises_anything_else(text: str) -> None:
    try:
        value = parse_quantity(text)
    except InvalidValue:
        return
    assert 0 < value <= MAX_QUANTITY


@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(sorted(SUFFIXES)),
)
def test_decimal_fractions_with_a_suffix_are_exact(whole: int, digits: int, suffix: str) -> None:
    text = f"{whole}.{digits}{suffix}"
    exact = (whole + Fraction(digits, 10 ** len(str(digits)))) * SUFFIXES[suffix]
    if exact == 0 or exact.denominator != 1 or exact > MAX_QUANTITY:
        with pytest.raises(InvalidValue):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == exact


UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50, "EiB": 2**60}


@given(st.integers(min_value=1, max_value=1023), st.sampled_from(sorted(UNITS)))
def test_format_then_parse_round_trips_whole_units(k: int, unit: str) -> None:
    n = k * UNITS[unit]
    assume(n <= MAX_QUANTITY)
    text = format_bytes(n)
    assert text == f"{k}.0 {unit}"
    assert parse_quantity(text.replace(".0 ", "").removesuffix("B")) == n


@given(st.integers(min_value=1024, max_value=MAX_QUANTITY))
def test_formatted_sizes_parse_back_within_rounding(n: int) -> None:
    match = re.fullmatch(r"([0-9]+\.[0-9]) ([KMGTPE]i)B", format_bytes(n))
    assert match, format_bytes(n)
    number, suffix = match.groups()
    # one decimal place: off by at most half a tenth of the unit
    assert abs(Fraction(number) * SUFFIXES[suffix] - n) <= SUFFIXES[suffix] / 20
    assert Fraction(number) < 1024


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (1, 1.0),
        ("0.75", 0.75),
        (" 0.1 ", 0.1),
        (1e-9, 1e-9),
        ("1e-1", 0.1),
        ("1", 1.0),
        (Fraction(1, 4), 0.25),
    ],
)
def test_valid_fractions(value: object, expected: float) -> None:
    assert parse_fraction(value, "memoryFraction") == expected


@pytest.mark.parametrize(
    "value",
    [
        *(0, 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf, "nan", "inf", "abc", "", None, True, [0.5]),
        *("0.0_1", "\u0660.\u0665", "0x1", "1/2", "-0.5", "0", False),
        pytest.param(10**400, id="int-beyond-float-range"),
    ],
)
def test_invalid_fractions_name_the_field_and_value(value: object) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_fraction(value, "spec.hardware.memoryFraction")
    assert str(info.value).startswith("spec.hardware.memoryFraction: ") and shown(value) in str(info.value)


@given(st.one_of(st.text(max_size=20), st.floats(), st.integers(), st.none(), st.booleans()))
def test_fractions_are_in_range_or_rejected(value: object) -> None:
    try:
        fraction = parse_fraction(value, "f")
    except InvalidValue:
        return
    assert 0 < fraction <= 1 and math.isfinite(fraction)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (900, "900 B"),
        (2048, "2.0 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (24 * 2**30, "24.0 GiB"),
        (-3 * 2**20, "-3.0 MiB"),
        (2**62, "4.0 EiB"),
        (2**20 - 1, "1.0 MiB"),
        (1023, "1023 B"),
        (MAX_QUANTITY, "8.0 EiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("text", ["24Gi\n", "\n24Gi", "\u0663Gi", "24\u00a0Gi"])
def test_only_the_whole_ascii_text_counts(text: str) -> None:
    with pytest.raises(InvalidValue, match="not a Kubernetes quantity"):
        parse_quantity(text)
