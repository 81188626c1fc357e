"""Kubernetes quantities and fractions, validated once with messages that name the field.

Budgets decide whether a machine survives, so parsing is exact (integers and ``Fraction``, never float) and
strict: ``24GB`` is a typo for ``24G`` or ``24Gi``, and guessing which is how hosts get over-committed. Only
ASCII digits count, and the whole text must match: ``"24Gi\\n"`` or ``"٣Gi"`` are rejected, not trimmed.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from fractions import Fraction

MAX_QUANTITY = 2**63 - 1

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
# Kubernetes also has sub-unit suffixes; for bytes they only make sense when they add up to whole bytes.
SUB_UNIT = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 10**3)}

_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
_QUANTITY = re.compile(
    rf"(?P<sign>[+-]?)(?P<number>{_NUMBER})"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|n|u|m)|[eE](?P<exponent>[+-]?[0-9]+))?"
)
_DECIMAL_NUMBER = re.compile(rf"[+-]?{_NUMBER}(?:[eE][+-]?[0-9]+)?")
_HINT = "use binary Ki Mi Gi Ti Pi Ei or decimal k M G T P E, e.g. 24Gi"
_FRACTION_RANGE = "expected a number with 0 < f <= 1"
_SHOWN_CHARS = 80
# No real size needs more characters; the cap also keeps Fraction under Python's 4300-digit conversion limit.
MAX_QUANTITY_CHARS = 100


class InvalidValue(ValueError):
    """A value that cannot be used; the message names the field and the value."""


def shown(value: object) -> str:
    """The value as a message shows it: strings double-quoted with escapes, long ones cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**_SHOWN_CHARS:
        return f"{'-' if value < 0 else ''}an integer of about {value.bit_length()} bits"
    text = json.dumps(value[: _SHOWN_CHARS + 1]) if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _scaled(number: str, exponent: int) -> Fraction | None:
    """``number × 10**exponent`` exactly, or None when it is certainly above ``MAX_QUANTITY``.

    Exponents far beyond the digits written cannot give a whole, in-range byte count; bounding them keeps
    ``1e999999999`` from building a billion-digit integer.
    """
    mantissa = Fraction(number)
    digits = len(number)
    if not mantissa:
        return mantissa
    if exponent > digits + 20:
        return None  # at least 10**-digits × 10**exponent > 10**20 > MAX_QUANTITY
    if exponent < -(digits + 20):
        exponent = -(digits + 20)  # below 10**-20 either way: a fraction of a byte, whatever its digits
    scale = Fraction(10) ** exponent
    return mantissa * Fraction(scale)


def parse_quantity(value: str | int | float, field: str = "quantity", positive: bool = True) -> int:
    """Bytes of a Kubernetes quantity such as ``24Gi``, ``512M``, ``1.5Gi``, ``1e9`` or ``1073741824``.

    Integral floats (YAML reads ``1.0e9`` as a float) are accepted; ``positive=False`` also allows zero.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidValue(f"{field}: {shown(value)} is not a quantity ({_HINT})")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"{field}: {shown(value)} is not finite ({_HINT})")
        if not value.is_integer():
            raise InvalidValue(f"{field}: {shown(value)} is not a whole number of bytes")
        value = int(value)
    if isinstance(value, int) and not -MAX_QUANTITY <= value <= MAX_QUANTITY:
        raise InvalidValue(f"{field}: {shown(value)} is out of range (at most {MAX_QUANTITY} bytes)")
    text = str(value)
    if len(text) > MAX_QUANTITY_CHARS:
        raise InvalidValue(
            f"{field}: {shown(text)} is too long for a quantity ({MAX_QUANTITY_CHARS} characters at most)"
        )
    match = _QUANTITY.fullmatch(text)  # not match(): "$" would let a trailing newline through
    if not match:
        raise InvalidValue(f"{field}: {shown(text)} is not a Kubernetes quantity ({_HINT})")
    sign, number, suffix, exponent = match.group("sign", "number", "suffix", "exponent")
    amount: Fraction | None
    if exponent is not None:
        amount = _scaled(number, int(exponent))
    else:
        amount = Fraction(number)
        if suffix in SUB_UNIT:
            amount *= SUB_UNIT[suffix]
        elif suffix:
            amount *= BINARY.get(suffix) or DECIMAL[suffix]
    if amount is None or amount > MAX_QUANTITY:
        raise InvalidValue(f"{field}: {shown(text)} is out of range (at most {MAX_QUANTITY} bytes)")
    if sign == "-" and amount:
        raise InvalidValue(f"{field}: {shown(text)} is negative; a size must be positive")
    if amount.denominator != 1:
        raise InvalidValue(f"{field}: {shown(text)} is not a whole number of bytes")
    if positive and amount == 0:
        raise InvalidValue(f"{field}: {shown(text)} must be more than zero bytes")
    return int(amount)


def parse_fraction(value: object, field: str) -> float:
    """A share of memory: a finite real number with 0 < f <= 1.

    TOML, environment variables and flags hand over strings, so ASCII decimal strings are accepted; booleans,
    ``None`` and anything else that merely converts to a number are not.
    """
    number: float
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise InvalidValue(f"{field}: {shown(value)} is not a number ({_FRACTION_RANGE})")
    if isinstance(value, str):
        if not _DECIMAL_NUMBER.fullmatch(value.strip()):
            raise InvalidValue(f"{field}: {shown(value)} is not a number ({_FRACTION_RANGE})")
        number = float(value.strip())
    else:
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range is certainly above 1
            raise InvalidValue(f"{field}: {shown(value)} is out of range ({_FRACTION_RANGE})") from None
    if not math.isfinite(number):
        raise InvalidValue(f"{field}: {shown(value)} is not finite ({_FRACTION_RANGE})")
    if not 0 < number <= 1:
        raise InvalidValue(f"{field}: {shown(value)} is out of range ({_FRACTION_RANGE})")
    return number


def format_bytes(n: int) -> str:
    """Human-readable binary size: ``24.0 GiB``, ``512.0 MiB``, ``900 B`` (negative values keep their sign)."""
    sign = "-" if n < 0 else ""
    if abs(n) < 1024:
        return f"{sign}{abs(n)} B"
    size = float(abs(n))
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if round(size, 1) < 1024:  # 1048575 bytes is "1.0 MiB", not "1024.0 KiB"
            return f"{sign}{size:.1f} {unit}"
    return f"{sign}{size / 1024:.1f} EiB"
