"""At start: the servers a previous agent left running, from the state file and from the marks in the process table.

Either source alone may fail: the state file can be torn, missing or of another shape, and a server started
before marks existed carries none. Both are read and merged by pid. Every server found is proven ours (pid,
create time, and the mark or the recorded command line) before anything touches it. One server per unit is
offered for adoption (the one on record, else the oldest); the others are strays the agent stops at once. A
marked process whose parent is marked too is a helper of that server and goes with its process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from agent.processes import marker
from agent.processes.statefile import BadRecord, ChildRecord, load

log = structlog.get_logger("metal_agent.adoption")


@dataclass
class Recovered:
    adoptable: dict[str, ChildRecord] = field(default_factory=dict)  # by unit: adopted if the unit still wants it
    strays: list[ChildRecord] = field(default_factory=list)  # ours, but no unit can want them: stopped at start


def scan(state: str, log_path_of: Callable[[str], Path]) -> list[ChildRecord]:
    """A record for every live process carrying this agent's mark whose parent does not (the server itself,
    not the helpers it started, which go with its process group)."""
    marked: dict[int, tuple[psutil.Process, dict[str, str]]] = {}
    for pid in psutil.pids():  # fresh objects: process_iter's cache can hold a recycled pid's old process
        if pid == os.getpid():
            continue
        try:
            process = psutil.Process(pid)
        except psutil.Error:
            continue
        env = marker.read(process, state)
        if env is not None:
            marked[process.pid] = (process, dict(env))
    records = []
    for pid, (process, env) in marked.items():
        try:
            if process.ppid() in marked or process.status() == psutil.STATUS_ZOMBIE:
                continue
            record = _record(process, env, state, log_path_of)
        except psutil.Error:
            continue  # gone meanwhile
        except BadRecord as exc:
            log.warning("marked process not adopted", pid=pid, reason=str(exc))
            continue
        records.append(record)
    return records


def recover(state_path: Path, state: str, log_path_of: Callable[[str], Path]) -> Recovered:
    """What to adopt and what to stop, whatever shape the state file is in."""
    recorded = {r.pid: r for r in load(state_path)}
    found = {r.pid: r for r in scan(state, log_path_of)}
    for pid in found.keys() - recorded.keys():
        log.info("server found by its mark", unit=found[pid].unit, pid=pid)
    candidates = {**recorded, **found}  # a marked process's record proves itself across exec
    recovered = Recovered()
    for record in sorted(candidates.values(), key=lambda r: (r.pid not in recorded, r.create_time)):
        if record.unit in recovered.adoptable:
            log.warning("second server for one unit: stopping it", unit=record.unit, pid=record.pid)
            recovered.strays.append(record)
        else:
            recovered.adoptable[record.unit] = record
    return recovered


def _record(
    process: psutil.Process, env: dict[str, str], state: str, log_path_of: Callable[[str], Path]
) -> ChildRecord:
    unit, spec_hash = env.get(marker.UNIT, ""), env.get(marker.SPEC_HASH, "")
    port = env.get(marker.PORT, "")
    if unit.count("/") != 1 or not all(unit.split("/")) or not spec_hash:
        raise BadRecord(f"its mark names no unit or spec ({unit[:200]!r})")
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise BadRecord(f"its mark has no valid port ({port[:20]!r})")
    health_path = env.get(marker.HEALTH_PATH) or "/health"
    return ChildRecord(
        unit=unit,
        spec_hash=spec_hash,
        pid=process.pid,
        create_time=process.create_time(),
        argv=process.cmdline(),
        port=int(port),
        log_path=str(log_path_of(unit)),
        health_path=health_path if health_path.startswith("/") else "/health",
        marker=state,
    )
