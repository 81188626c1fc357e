"""What the agent started, on disk, so that a restarted agent adopts its healthy children and reaps the rest.

A pid alone proves nothing (pids are recycled): a record matches a live process only when the pid, the
process's create time and its command line are all the same. A process that fails the check is never touched.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import structlog

from agent.safe_files import private_dir, write_atomic
from agent.supervisor import Child

log = structlog.get_logger("metal_agent.statefile")


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

    def child(self) -> Child:
        return Child(self.pid, self.port, self.argv, Path(self.log_path), self.create_time, None, self.health_path)

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
            if process.cmdline() != self.argv:
                return f"another command line: {process.cmdline()!r}"
        except psutil.Error as exc:
            return f"gone ({type(exc).__name__})"
        return None


def save(path: Path, records: list[ChildRecord]) -> None:
    """Write atomically (0600, in a 0700 directory): a crash mid-write must not lose the record of running children.

    Raises OSError when the disk refuses; no temporary file is left behind (agent/state_keeper.py decides).
    """
    private_dir(path.parent)
    data = json.dumps({"version": 1, "children": [asdict(r) for r in records]}).encode()
    write_atomic(path, data)


def load(path: Path) -> list[ChildRecord]:
    """The records of children that are still ours; an unreadable file means none (and nothing is touched)."""
    try:
        data = json.loads(path.read_text())
        records = [ChildRecord(**item) for item in data["children"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    ours = []
    for record in records:
        why_not = record.mismatch()
        if why_not is None:
            ours.append(record)
        elif not why_not.startswith(("gone", "exited")):
            log.warning("recorded child not adopted", unit=record.unit, pid=record.pid, reason=why_not)
    return ours
