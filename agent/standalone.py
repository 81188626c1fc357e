"""The standalone source: a directory of Model and InferenceService manifests, watched for changes.

Files are polled (mtime and size) rather than watched with OS notifications: it works the same on macOS and
Linux, needs no extra package, and a manifest directory is small. Each change yields events for the objects
whose spec changed; a bad file is reported with its path and field and its objects are skipped, while the
other files keep running.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import anyio
import structlog

from agent.manifest import ManifestError, ModelSpec, ServiceSpec, load_file

log = structlog.get_logger("metal_agent.standalone")
Obj = ModelSpec | ServiceSpec


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class Event:
    type: EventType
    obj: Obj


class Synced:
    """Sent once a source has delivered its first complete listing: what is not in it does not exist."""


SYNCED = Synced()


def object_key(obj: Obj) -> tuple[str, str, str]:
    return (type(obj).__name__, obj.namespace, obj.name)


def read_directory(directory: Path) -> tuple[dict[tuple[str, str, str], Obj], dict[str, str]]:
    """Every valid object in the directory, and an error message per bad file."""
    objects: dict[tuple[str, str, str], Obj] = {}
    errors: dict[str, str] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            for obj in load_file(path):
                objects[object_key(obj)] = obj
        except ManifestError as exc:
            errors[str(path)] = str(exc)
    return objects, errors


def _fingerprint(directory: Path) -> tuple[tuple[str, float, int], ...]:
    entries = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((str(path), stat.st_mtime, stat.st_size))
    return tuple(entries)


def diff(old: dict[tuple[str, str, str], Obj], new: dict[tuple[str, str, str], Obj]) -> list[Event]:
    """Events that turn ``old`` into ``new``; an object whose spec is unchanged yields nothing."""
    events = [Event(EventType.DELETED, obj) for key, obj in old.items() if key not in new]
    for key, obj in new.items():
        if key not in old:
            events.append(Event(EventType.ADDED, obj))
        elif _spec(old[key]) != _spec(obj):
            events.append(Event(EventType.MODIFIED, obj))
    return events


def _spec(obj: Obj) -> Obj:
    return type(obj)(**{**obj.__dict__, "origin": "", "generation": 0})


async def watch(
    directory: Path,
    interval: float = 1.0,
    on_errors: Callable[[dict[str, str]], None] | None = None,
    on_synced: Callable[[], None] | None = None,
) -> AsyncIterator[Event]:
    """Events for the directory's objects: everything at start, then each change; bad files go to ``on_errors``."""
    known: dict[tuple[str, str, str], Obj] = {}
    reported: dict[str, str] = {}
    fingerprint: tuple[tuple[str, float, int], ...] | None = None
    synced = False
    while True:
        current = _fingerprint(directory)
        if current != fingerprint:
            fingerprint = current
            objects, errors = read_directory(directory)
            for path, message in errors.items():
                if reported.get(path) != message:
                    log.error("invalid manifest", file=path, error=message)
            reported = errors
            if on_errors:
                on_errors(errors)
            # A file that became invalid keeps its last good objects rather than deleting running models.
            for key, obj in known.items():
                if key not in objects and obj.origin.split("#")[0] in errors:
                    objects[key] = obj
            for event in diff(known, objects):
                yield event
            if on_synced and not synced:  # the first full listing has been delivered
                on_synced()
            synced = True
            known = objects
        await anyio.sleep(interval)
