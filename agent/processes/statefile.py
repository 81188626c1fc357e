"""What the agent started, on disk, so that a restarted agent adopts its healthy children and reaps the rest.

A pid alone proves nothing (pids are recycled): a record matches a live process only when the pid and the
process's create time are the same and the process either carries this agent's mark in its environment
(``agent.processes.marker``, which survives a wrapper's ``exec``) or still has the recorded command line. A process that
fails the check is never touched.

The file is an aid, not the truth: it may be torn, hand-edited or of another shape. Every record is checked
field by field; a bad one is skipped with a warning naming it, and an unreadable file means no records (the
marks in the process table still find the servers, see ``agent.processes.adoption``).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent.processes import marker
from agent.processes.supervisor import Child
from agent.util.safe_files import private_dir, read_bytes, write_atomic

log = structlog.get_logger("metal_agent.statefile")
VERSION = 1
QUOTE = 200  # characters of the file's own content a warning may quote
WARN_RECORDS = 10  # bad records warned about one by one; the rest are counted in one line
_REPR = reprlib.Repr()  # bounded depth and length, whatever the value
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, QUOTE, QUOTE, 40


class BadRecord(ValueError):
    """A record that cannot describe a child; the message says which field and why."""


@dataclass(frozen=True)
class ChildRecord:
    unit: str
    spec_hash: str
    pid: int
    create_time: float
    argv: list[str]
    port: int
    log_path: str
    health_path: str = "/health"  # absent from records written before it was kept
    marker: str = ""  # the state id in the child's environment; "" for children started without a mark

    def child(self) -> Child:
        return Child(
            self.pid, self.port, self.argv, Path(self.log_path), self.create_time, None, self.health_path,
            marker=self.marker,
        )  # fmt: skip

    def is_ours(self) -> bool:
        return self.mismatch() is None

    def mismatch(self) -> str | None:
        """None when the live process is the one recorded; else why not (gone, recycled pid, other command)."""
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return "exited"
            if process.create_time() != self.create_time:
                return f"pid reused: created at {process.create_time()}, recorded {self.create_time}"
            if self.marker and marker.carries(process, self.marker, self.unit):
                return None  # started by this agent for this unit, whatever it exec'd since
            if process.cmdline() != self.argv:
                return f"another command line: {_quote(process.cmdline())}"
        except psutil.Error as exc:
            return f"gone ({type(exc).__name__})"
        return None


def save(path: Path, records: list[ChildRecord]) -> None:
    """Write atomically (0600, in a 0700 directory): a crash mid-write must not lose the record of running children.

    Raises OSError when the disk refuses; no temporary file is left behind (agent/processes/state_keeper.py decides).
    """
    private_dir(path.parent)
    data = json.dumps({"version": VERSION, "children": [asdict(r) for r in records]}).encode()
    write_atomic(path, data)


MAX_STATE_BYTES = 64 << 20  # thousands of records; a larger file is not one this agent wrote


def load(path: Path) -> list[ChildRecord]:
    """The records of children that are still ours; an unreadable file means none (and nothing is touched)."""
    try:
        text = read_bytes(path, MAX_STATE_BYTES).decode(errors="replace")  # never a FIFO, a device or a flood
    except FileNotFoundError:
        return []
    except OSError as exc:  # a directory in its place, no permission, an I/O error
        log.warning("state file unreadable: servers are found by their mark", path=str(path), error=str(exc))
        return []
    ours = []
    for record in parse(text, str(path)):
        why_not = record.mismatch()
        if why_not is None:
            ours.append(record)
        elif not why_not.startswith(("gone", "exited")):
            log.warning("recorded child not adopted", unit=record.unit, pid=record.pid, reason=why_not)
    return ours


def parse(text: str, where: str) -> list[ChildRecord]:
    """Every valid record in the file's text; each bad one is skipped with a warning naming it."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # torn, not JSON, or nested too deep to decode
        log.warning("state file unreadable: servers are found by their mark", path=where, error=_quote(str(exc)))
        return []
    if not isinstance(data, dict) or not isinstance(data.get("children"), list):
        log.warning("state file of another shape ignored: servers are found by their mark", path=where)
        return []
    if data.get("version") != VERSION:
        log.warning("state file of another version ignored", path=where, version=_quote(data.get("version")))
        return []
    records, bad = [], 0
    for index, item in enumerate(data["children"]):
        try:
            records.append(record_from(item))
        except BadRecord as exc:
            bad += 1
            if bad <= WARN_RECORDS:
                unit = item.get("unit") if isinstance(item, dict) else None
                log.warning("state record skipped", path=where, record=index, unit=_quote(unit), reason=str(exc))
    if bad > WARN_RECORDS:
        log.warning("more state records skipped", path=where, count=bad - WARN_RECORDS)
    return records


def record_from(item: object) -> ChildRecord:
    """A record from its JSON object, every field checked; unknown fields (a newer agent's) are ignored."""
    if not isinstance(item, dict):
        raise BadRecord(f"not an object but {type(item).__name__}")
    unit = _text(item, "unit")
    if unit.count("/") != 1 or not all(unit.split("/")):
        raise BadRecord(f"unit {_quote(unit)} is not NAMESPACE/NAME")
    argv = item.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRecord("argv is not a non-empty list of strings")
    health_path = _text(item, "health_path", "/health")
    if not health_path.startswith("/"):
        raise BadRecord(f"health_path {_quote(health_path)} does not start with /")
    return ChildRecord(
        unit=unit,
        spec_hash=_text(item, "spec_hash"),
        pid=_integer(item, "pid", 1, 2**31 - 1),
        create_time=_time(item),
        argv=list(argv),
        port=_integer(item, "port", 1, 65535),
        log_path=_text(item, "log_path"),
        health_path=health_path,
        marker=_text(item, "marker", ""),
    )


def _text(item: dict[str, Any], name: str, default: str | None = None) -> str:
    value = item.get(name, default)
    if not isinstance(value, str) or (default is None and not value):
        raise BadRecord(f"{name} {_quote(value)} is not a non-empty string")
    return value


def _integer(item: dict[str, Any], name: str, low: int, high: int) -> int:
    value = item.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRecord(f"{name} {_quote(value)} is not an integer from {low} to {high}")
    return value


def _time(item: dict[str, Any]) -> float:
    value = item.get("create_time")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadRecord(f"create_time {_quote(value)} is not a time")
    return float(value)


def _quote(value: object) -> str:
    """At most ``QUOTE`` characters of a value read from the file (which may be huge or deeply nested)."""
    text = value if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= QUOTE else text[:QUOTE] + "…"
