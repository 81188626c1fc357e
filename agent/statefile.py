"""What the agent started, on disk, so that a restarted agent adopts its healthy children and reaps the rest.

A pid alone proves nothing (pids are recycled): a record matches a live process only when the pid, the
process's create time and its command line are all the same. A process that fails the check is never touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from agent.supervisor import Child


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
        try:
            process = psutil.Process(self.pid)
            return (
                process.create_time() == self.create_time
                and process.cmdline() == self.argv
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False


def save(path: Path, records: list[ChildRecord]) -> None:
    """Write atomically: a crash mid-write must not lose the record of running children."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump({"version": 1, "children": [asdict(r) for r in records]}, out)
    os.replace(temp, path)


def load(path: Path) -> list[ChildRecord]:
    """The records of children that are still ours; an unreadable file means none (and nothing is touched)."""
    try:
        data = json.loads(path.read_text())
        records = [ChildRecord(**item) for item in data["children"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [record for record in records if record.is_ours()]
