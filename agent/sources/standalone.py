"""The standalone source: a directory of Model and InferenceService manifests, watched for changes.

Files are polled (size, mtime, inode, ctime) rather than watched with OS notifications: it works the same on macOS
and Linux, needs no extra package, sees files replaced through symlinks and on network mounts (where notifications
are missed), and a manifest directory is small. Only the files that changed are read and parsed again, in a worker
thread. Each change yields events for the objects whose spec changed; a bad file (invalid, unreadable, not a
regular file, too large) is reported with its path and reason and its objects are skipped, while the other files
keep running.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import anyio
import anyio.to_thread
import structlog

from agent.sources.manifest import MAX_MANIFEST_BYTES, ManifestError, ModelSpec, ServiceSpec, parse_documents
from agent.util.safe_files import read_bytes

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


@dataclass(frozen=True)
class _Parsed:
    """One file's parse: its stat key and content digest, and its objects or its error message."""

    key: tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns
    digest: str
    racy: bool  # modified so close to when it was read that a same-size rewrite could keep the same key
    objects: tuple[Obj, ...] = ()
    error: str | None = None


RACY_SECONDS = 2.0  # mtime granularity of the coarsest file systems we meet (FAT, some network mounts: 2 s)


class ManifestScanner:
    """Parses only the manifests that changed since the last scan.

    A file is known by its size, mtime_ns, inode and ctime_ns; an unchanged key means an unchanged file, except when
    the file was modified within ``RACY_SECONDS`` of being read (a rewrite in the same clock tick keeps the same
    mtime): such a file is read again and compared by content digest, and parsed again only if that changed. A
    file whose content is the same after a touch is not parsed again either. Reads go through the safe reader,
    capped at ``max_bytes``, so a FIFO, a device or a huge file is an invalid manifest, never a stall.
    """

    def __init__(self, directory: Path, max_bytes: int = MAX_MANIFEST_BYTES) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.files: dict[str, _Parsed] = {}
        self.parses = 0  # files parsed so far (tests read it)
        self.scanned = False

    def scan(self) -> tuple[dict[tuple[str, str, str], Obj], dict[str, str]] | None:
        """Every valid object and an error per bad file; None when nothing changed since the last scan."""
        changed = False
        seen: dict[str, _Parsed] = {}
        for path in sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")]):
            name = str(path)
            try:
                info = path.stat()  # follows links: a link's target changing is a change
            except OSError:
                continue  # gone since the listing (or a dangling link): as if never there
            key = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
            old = self.files.get(name)
            if old is not None and old.key == key and not old.racy:
                seen[name] = old
                continue
            parsed = self._read(path, key, old)
            changed |= old is None or parsed.digest != old.digest or parsed.error != old.error
            seen[name] = parsed
        changed |= seen.keys() != self.files.keys() or not self.scanned  # the first listing counts, even empty
        self.files, self.scanned = seen, True
        if not changed:
            return None
        objects: dict[tuple[str, str, str], Obj] = {}
        errors: dict[str, str] = {}
        for name, parsed in seen.items():
            if parsed.error is not None:
                errors[name] = parsed.error
            for obj in parsed.objects:
                objects[object_key(obj)] = obj
        return objects, errors

    def _read(self, path: Path, key: tuple[int, int, int, int], old: _Parsed | None) -> _Parsed:
        racy = time.time_ns() - key[1] < RACY_SECONDS * 1e9
        try:
            data = read_bytes(path, self.max_bytes)
        except OSError as exc:
            error = f"{path}: cannot read: {exc.strerror if exc.strerror else exc}"
            return _Parsed(key, "", False, error=error)  # its key changes when it is replaced
        digest = hashlib.sha256(data).hexdigest()
        if old is not None and old.digest == digest:
            return _Parsed(key, digest, racy, old.objects, old.error)
        self.parses += 1
        try:
            objects = tuple(parse_documents(path, data))
        except ManifestError as exc:
            return _Parsed(key, digest, racy, error=str(exc))
        return _Parsed(key, digest, racy, objects)


def read_directory(
    directory: Path, max_bytes: int = MAX_MANIFEST_BYTES
) -> tuple[dict[tuple[str, str, str], Obj], dict[str, str]]:
    """Every valid object in the directory, and an error message per bad file."""
    found = ManifestScanner(directory, max_bytes).scan()
    return found if found is not None else ({}, {})


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
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> AsyncIterator[Event]:
    """Events for the directory's objects: everything at start, then each change; bad files go to ``on_errors``.

    Each scan runs in a worker thread: reading and parsing never holds up the event loop (the API, probes, signals).
    """
    scanner = ManifestScanner(directory, max_bytes)
    known: dict[tuple[str, str, str], Obj] = {}
    reported: dict[str, str] = {}
    synced = False
    while True:
        found = await anyio.to_thread.run_sync(scanner.scan)
        if found is not None:
            objects, errors = found
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
