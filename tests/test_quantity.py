"""Kubernetes quantities and fractions: exact, strict, and errors that name field and value."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.quantity import (
    BINARY,
    DECIMAL,
    MAX_QUANTITY,
    InvalidValue,
    format_bytes,
    parse_fraction,
    parse_quantity,
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
        "9223372036854775808",
        "9Ei",
        "1e400",
        "Gi",
        "1.2.3Gi",
        "0x10",
        "1e-3",
    ],
)
def test_invalid_quantities_name_the_field_and_value(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_quantity(text, "spec.hardware.memoryBudget")
    message = str(info.value)
    assert message.startswith("spec.hardware.memoryBudget: ") and repr(text) in message


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_non_quantity_types(value: object) -> None:
    with pytest.raises(InvalidValue):
        parse_quantity(value)  # type: ignore[arg-type]


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


@given(st.text(max_size=30))
def test_random_text_never_raises_anything_else(text: str) -> None:
    try:
        value = parse_quantity(text)
    except InvalidValue:
        return
    assert 0 < value <= MAX_QUANTITY


@pytest.mark.parametrize(("value", "expected"), [(0.5, 0.5), (1, 1.0), ("0.75", 0.75), (" 0.1 ", 0.1), (1e-9, 1e-9)])
def test_valid_fractions(value: object, expected: float) -> None:
    assert parse_fraction(value, "memoryFraction") == expected


@pytest.mark.parametrize(
    "value",
    [0, 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf, "nan", "inf", "abc", "", None, True, [0.5]],
)
def test_invalid_fractions_name_the_field_and_value(value: object) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_fraction(value, "spec.hardware.memoryFraction")
    assert str(info.value).startswith("spec.hardware.memoryFraction: ") and repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (900, "900 B"),
        (2048, "2.0 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (24 * 2**30, "24.0 GiB"),
        (-3 * 2**20, "-3.0 MiB"),
        (2**62, "4.0 EiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("text", ["24Gi\n", "\n24Gi", "\u0663Gi", "24\u00a0Gi"])
def test_only_the_whole_ascii_text_counts(text: str) -> None:
    with pytest.raises(InvalidValue, match="not a Kubernetes quantity"):
        parse_quantity(text)
