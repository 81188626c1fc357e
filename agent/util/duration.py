"""Durations as Kubernetes writes them (Go's ``time.ParseDuration`` subset: ``10m``, ``1h30m``, ``45s``, ``500ms``).

Used for ``spec.idleTimeout``. Parsing is strict like the quantities: the whole text must match, only ASCII digits,
and a duration must be positive (an idle timeout of nothing would stop a server between two requests).
"""

from __future__ import annotations

import re

from agent.util.quantity import InvalidValue, shown

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+")
MAX_SECONDS = 366 * 86400.0


def parse_duration(text: object, where: str) -> float:
    """Seconds in ``text`` (e.g. ``"10m"``); raises InvalidValue naming ``where``."""
    if not isinstance(text, str) or not text.isascii() or not _WHOLE.fullmatch(text):
        raise InvalidValue(f"{where}: {shown(text)} is not a duration (e.g. 30s, 10m, 1h30m)")
    total = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(text))
    if not 0 < total <= MAX_SECONDS:
        raise InvalidValue(f"{where}: {shown(text)} is out of range (more than 0, at most 366 days)")
    return total


def format_duration(seconds: float) -> str:
    """``630`` -> ``10m30s``: how status lines show a timer."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs or not whole else ""]
    return "".join(parts)
