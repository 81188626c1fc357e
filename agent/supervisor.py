"""Start, probe and stop inference server processes.

Children run in their own session (process group), so a stop reaches everything they started. Their output
goes to a per-unit log file opened in append mode; the agent bounds it by copy-and-truncate (the child's
O_APPEND descriptor keeps writing at the new end), keeping one rotated file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import psutil

from agent.hookspecs import Launch
from agent.marker import STATE_ID

LOG_LIMIT_BYTES = 8 << 20


class StartupFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with the last lines of its log."""


@dataclass
class Child:
    pid: int
    port: int
    argv: list[str]
    log_path: Path
    create_time: float
    process: subprocess.Popen[bytes] | None = None  # None for a child adopted after an agent restart
    health_path: str = "/health"
    marker: str = ""  # the state id in its environment (agent.marker); "" when started without a mark

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.create_time and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None


def tail_lines(path: Path, count: int = 20) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - 64 * 1024))
            lines = deque(log.read().decode(errors="replace").splitlines(), maxlen=count)
    except OSError:
        return ""
    return "\n".join(lines)


def bound_log(path: Path, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep a child's log under ``limit``: copy it to ``.1`` and truncate it in place."""
    try:
        if path.stat().st_size <= limit:
            return
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        with path.open("r+b") as log:
            log.truncate(0)
    except OSError:
        return


def start(launch: Launch, port: int, log_path: Path, mark: Mapping[str, str] | None = None) -> Child:
    """Start the server in its own session; ``mark`` (``agent.marker.child_env``) goes into its environment."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=launch.cwd,
            env={**os.environ, **launch.env, **(mark or {})},
            start_new_session=True,
        )
    started = psutil.Process(process.pid)
    create_time = started.create_time()
    # The command line as the OS reports it (a script's interpreter included): what adoption compares later.
    try:
        argv = started.cmdline() or launch.argv
    except psutil.Error:
        argv = launch.argv
    state = (mark or {}).get(STATE_ID, "")
    return Child(process.pid, port, argv, log_path, create_time, process, launch.health_path, state)


async def healthy(child: Child, path: str = "/health", timeout: float = 2.0) -> bool:
    url = f"http://127.0.0.1:{child.port}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def wait_ready(child: Child, path: str, timeout: float, grace: float) -> None:
    """Poll health until 200; on exit or timeout stop the child and raise with its log tail."""
    with anyio.move_on_after(timeout):
        while child.running():
            if await healthy(child, path):
                return
            await anyio.sleep(0.1)
    if child.running():
        await stop(child, grace)
        problem = f"not healthy within {timeout:g} s"
    else:
        problem = f"exited with status {child.exit_code} while starting"
    raise StartupFailed(f"{problem}; last log lines:\n{tail_lines(child.log_path)}")


async def stop(child: Child, grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL after ``grace`` seconds; returns when it is gone."""
    if not child.running():
        _reap(child)
        return
    _signal_group(child, signal.SIGTERM)
    with anyio.move_on_after(grace):
        while child.running():
            await anyio.sleep(0.05)
    if child.running():
        _signal_group(child, signal.SIGKILL)
        while child.running():
            await anyio.sleep(0.02)
    _reap(child)


def _signal_group(child: Child, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:  # not a group leader (an adopted server whose wrapper forked it and exited)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child.pid, signum)
    except PermissionError:
        pass


def _reap(child: Child) -> None:
    if child.process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=1)
