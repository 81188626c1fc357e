"""What of a user's input may appear in a message: a bounded quote, and URLs without their secrets.

Manifests, sources and server output are written by others; a message that quotes them whole can be made to
weigh megabytes (an expanded YAML alias became a 522 MB log line and a 522 MB ``/status``), and a URL quoted whole
hands its password or signed query (``?token=``) to every reader of the log, the status and the Kubernetes Events.
So every quote of user input goes through ``quoted`` (at most ``INPUT_CHARS`` characters), and every URL that
reaches a log, a status, an Event or an error goes through ``redact_url`` (or ``redact_text`` for free text that
may contain some): user, password and query are dropped, the query shown as ``?…``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

INPUT_CHARS = 200  # the most characters of user input any message quotes
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")


def canonical(url: str) -> str:
    """The URL without user, password, query or fragment: what identifies the file (signed URLs change)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number: keep nothing of it
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def redact_url(url: str) -> str:
    """A URL fit for messages and logs: no user, password or query (signed URLs carry tokens there)."""
    try:
        parts = urlsplit(url)
        return canonical(url) + ("?…" if parts.query else "")
    except ValueError:  # not even parseable: show only its scheme
        return url.split("://", 1)[0] + "://…"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (exception messages and server output may contain some)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


def quoted(value: object, limit: int = INPUT_CHARS) -> str:
    """User input as a message quotes it: ``repr``, URLs redacted, cut to ``limit`` characters with an ellipsis."""
    if isinstance(value, str):
        text = repr(redact_text(value[: limit * 4]))  # the cut comes first: a huge value is never copied whole
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        text = f"an integer of {value.bit_length()} bits"
    elif isinstance(value, (list, tuple, dict)):
        text = redact_text(_bounded_repr(value, limit + 1))
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_repr(value: object, limit: int) -> str:
    """``repr`` of a nested container that stops once ``limit`` characters are written (an alias tree is huge)."""
    out: list[str] = []
    size = 0

    def emit(piece: str) -> bool:
        nonlocal size
        out.append(piece)
        size += len(piece)
        return size < limit

    def walk(item: object, depth: int) -> bool:
        if depth > 20:
            return emit("…")
        if isinstance(item, dict):
            if not emit("{"):
                return False
            for index, (key, inner) in enumerate(item.items()):
                if (index and not emit(", ")) or not walk(key, depth + 1) or not emit(": "):
                    return False
                if not walk(inner, depth + 1):
                    return False
            return emit("}")
        if isinstance(item, (list, tuple)):
            if not emit("["):
                return False
            for index, inner in enumerate(item):
                if (index and not emit(", ")) or not walk(inner, depth + 1):
                    return False
            return emit("]")
        return emit(repr(item[: limit + 1] if isinstance(item, str) else item))

    walk(value, 0)
    return "".join(out)[:limit]
