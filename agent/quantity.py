"""Kubernetes quantities and fractions, validated once with messages that name the field.

Budgets decide whether a machine survives, so parsing is exact (integers and ``Fraction``, never float) and
strict: ``24GB`` is a typo for ``24G`` or ``24Gi``, and guessing which is how hosts get over-committed.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_QUANTITY = 2**63 - 1

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)|[eE](?P<exponent>[+-]?[0-9]+))?"
)
_HINT = "use binary Ki Mi Gi Ti Pi Ei or decimal k M G T P E, e.g. 24Gi"


class InvalidValue(ValueError):
    """A value that cannot be used; the message names the field and the value."""


def parse_quantity(value: str | int, field: str = "quantity", positive: bool = True) -> int:
    """Bytes of a Kubernetes quantity such as ``24Gi``, ``512M``, ``1e9`` or ``1073741824``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidValue(f"{field}: {value!r} is not a quantity ({_HINT})")
    text = str(value)
    match = _QUANTITY.fullmatch(text)  # not match(): "$" would let a trailing newline through
    if not match:
        raise InvalidValue(f"{field}: {text!r} is not a Kubernetes quantity ({_HINT})")
    sign, number, suffix, exponent = match.group("sign", "number", "suffix", "exponent")
    if exponent is not None and abs(int(exponent)) > 30:
        raise InvalidValue(f"{field}: {text!r} is out of range (at most {MAX_QUANTITY} bytes)")
    amount = Fraction(number)
    if suffix == "m":
        amount /= 1000
    elif suffix:
        amount *= BINARY.get(suffix) or DECIMAL[suffix]
    elif exponent is not None:
        amount *= Fraction(10) ** int(exponent)
    if sign == "-" and amount:
        raise InvalidValue(f"{field}: {text!r} is negative; a size must be positive")
    if amount.denominator != 1:
        raise InvalidValue(f"{field}: {text!r} is not a whole number of bytes")
    if amount > MAX_QUANTITY:
        raise InvalidValue(f"{field}: {text!r} is out of range (at most {MAX_QUANTITY} bytes)")
    if positive and amount == 0:
        raise InvalidValue(f"{field}: {text!r} must be more than zero bytes")
    return int(amount)


def parse_fraction(value: object, field: str) -> float:
    """A fraction of memory: a finite number with 0 < f <= 1 (numeric strings accepted for env and flags)."""
    if isinstance(value, bool):
        raise InvalidValue(f"{field}: {value!r} is not a number (expected 0 < f <= 1)")
    number: float
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InvalidValue(f"{field}: {value!r} is not a number (expected 0 < f <= 1)") from None
    else:
        raise InvalidValue(f"{field}: {value!r} is not a number (expected 0 < f <= 1)")
    if not math.isfinite(number):
        raise InvalidValue(f"{field}: {value!r} is not finite (expected 0 < f <= 1)")
    if not 0 < number <= 1:
        raise InvalidValue(f"{field}: {value!r} is out of range (expected 0 < f <= 1)")
    return number


def format_bytes(n: int) -> str:
    """Human-readable binary size: ``24.0 GiB``, ``512.0 MiB``, ``900 B`` (negative values keep their sign)."""
    sign = "-" if n < 0 else ""
    if abs(n) < 1024:
        return f"{sign}{abs(n)} B"
    size = float(abs(n))
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024:
            return f"{sign}{size:.1f} {unit}"
    return f"{sign}{size / 1024:.1f} EiB"
