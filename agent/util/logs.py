"""Logging: one renderer for structlog and the standard library, on stderr, at one level.

stdout stays for command output (tables, JSON), so logs never corrupt what a script parses. On a terminal the
lines are a coloured console; otherwise (a service, a pipe, a file) they are JSON lines a log shipper can parse.
Standard-library records (aiohttp, kubernetes-asyncio, asyncio) reach the same handler through structlog's
ProcessorFormatter, so they look alike and obey the same level.

Tracebacks never show local variables: a frame of the Kubernetes client may hold a bearer token from a
kubeconfig, and logs are shipped and shared. Both renderers are therefore built with locals switched off, and
the console never picks rich or better-exceptions on its own (their default is to show locals).

structlog is imported when logging is configured, not with this module: the command line takes its flags from
here, and ``metal-agent --version`` should not pay for a logging library it never uses.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from agent.util.quantity import InvalidValue, shown
from agent.util.redact import redact_text

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")
LEVEL_ENV = "METAL_AGENT_LOG_LEVEL"
FORMAT_ENV = "METAL_AGENT_LOG_FORMAT"
DEFAULT_LEVEL, DEFAULT_FORMAT = "info", "auto"

# Per task: what the unit's worker is running now (executor, pid), read when a line is logged, so it is never stale.
_unit_live: ContextVar[Callable[[], Mapping[str, object]] | None] = ContextVar("metal_agent_unit_live", default=None)


def parse_level(text: str, field: str = "--log-level") -> int:
    """The logging level for ``text`` (any case), or InvalidValue naming the field and the choices."""
    name = text.strip().lower()
    if name not in LEVELS:
        raise InvalidValue(f"{field}: {shown(text)} is not a log level; use one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name.upper()]


def parse_format(text: str, field: str = "--log-format") -> str:
    name = text.strip().lower()
    if name not in FORMATS:
        raise InvalidValue(f"{field}: {shown(text)} is not a log format; use one of {', '.join(FORMATS)}")
    return name


def add_arguments(parser: Any, default: Any = None) -> None:
    """``--log-level`` and ``--log-format`` (given to ``metal-agent`` and to every subcommand)."""
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=default,
        help=f"{', '.join(LEVELS)} (default {DEFAULT_LEVEL}; env {LEVEL_ENV}); applies to library logs too",
    )
    parser.add_argument(
        "--log-format",
        metavar="FORMAT",
        default=default,
        help=(
            f"{', '.join(FORMATS)} (default {DEFAULT_FORMAT}: console on a terminal, JSON lines otherwise; "
            f"env {FORMAT_ENV})"
        ),
    )


def configure_from(level: str | None, fmt: str | None, environ: Mapping[str, str] = os.environ) -> None:
    """Configure from flags, else the environment, else the defaults; InvalidValue names the flag or variable."""
    level_text, level_field = (level, "--log-level") if level is not None else (environ.get(LEVEL_ENV), LEVEL_ENV)
    fmt_text, fmt_field = (fmt, "--log-format") if fmt is not None else (environ.get(FORMAT_ENV), FORMAT_ENV)
    configure(
        parse_level(level_text, level_field) if level_text is not None else DEFAULT_LEVEL,
        parse_format(fmt_text, fmt_field) if fmt_text is not None else DEFAULT_FORMAT,
    )


def configure(level: str | int = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT) -> None:
    """Route structlog and the standard library through one stderr handler. Safe to call again (tests do)."""
    import structlog

    level_no = parse_level(level) if isinstance(level, str) else level
    fmt = parse_format(fmt)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_unit_context,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_urls,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,  # loggers made at import time follow a later configure
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(console)],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)


def _renderer(console: bool) -> list[Processor]:
    import structlog

    if console:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        # plain_traceback, chosen explicitly: the default would be rich or better-exceptions where installed.
        return [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)]
    no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    return [structlog.processors.ExceptionRenderer(no_locals), structlog.processors.JSONRenderer()]


def bind_unit(key: str, live: Callable[[], Mapping[str, object]]) -> None:
    """In the calling task: every line carries ``unit=key`` and what ``live()`` returns then (None values left out).

    Called at the start of a unit's worker task; the binding ends with the task.
    """
    import structlog

    structlog.contextvars.bind_contextvars(unit=key)
    _unit_live.set(live)


def _add_unit_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    live = _unit_live.get()
    if live is not None:
        for key, value in live().items():
            if value is not None:
                event_dict.setdefault(key, value)
    return event_dict


def _redact_urls(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """No URL in a log line keeps its user, password or query (signed URLs and tokens live there)."""
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = redact_text(value)
    return event_dict


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged: tests and daemons replace it after start."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)
