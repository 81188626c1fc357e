"""Start, probe and stop inference server processes.

Children run in their own session (process group), so a stop reaches everything they started, with a scrubbed
environment (agent/processes/server_env.py). Their output goes through a pipe to a log writer process
(agent/processes/logwriter.py) that rotates the per-unit log file before it passes its size bound, however fast
the server writes; the writer outlives an agent restart with its server and ends when the server's output closes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import psutil

from agent.hookspecs import Launch
from agent.processes.marker import STATE_ID
from agent.processes.server_env import server_environment
from agent.util.redact import redact_text
from agent.util.safe_files import open_regular, private_dir

LOG_LIMIT_BYTES = 8 << 20
TAIL_BYTES = 64 * 1024
MAX_LINE_CHARS = 500  # a log line quoted in a status: a server may print megabytes without a newline
WRITER = str(Path(__file__).with_name("logwriter.py"))


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
    writer: subprocess.Popen[bytes] | None = None  # its log writer; None when adopted
    marker: str = ""  # the state id in its environment (agent.processes.marker); "" when started without a mark

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
    """The last ``count`` lines of a log (from its last 64 KiB), URLs redacted; empty when it cannot be read."""
    try:
        with open_regular(path) as (fd, size):
            os.lseek(fd, max(0, size - TAIL_BYTES), os.SEEK_SET)
            data = os.read(fd, TAIL_BYTES)
    except OSError:
        return ""
    lines = deque(data.decode(errors="replace").splitlines(), maxlen=count)
    return redact_text("\n".join(line[:MAX_LINE_CHARS] for line in lines))


@dataclass(frozen=True)
class LogSettings:
    max_bytes: int = LOG_LIMIT_BYTES
    keep: int = 2


def start(
    launch: Launch,
    port: int,
    log_path: Path,
    log: LogSettings | None = None,
    env_allow: tuple[str, ...] | None = None,
    mark: Mapping[str, str] | None = None,
) -> Child:
    """Spawn the server with its output piped to a log writer; raises OSError when either cannot start.

    ``mark`` (``agent.processes.marker.child_env``) goes into the server's environment, after the allowlist, so that a
    later agent finds it in the process table; the log writer carries no mark (it is not a server).
    """
    log = log or LogSettings()
    private_dir(log_path.parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)  # there from the start
    try:
        os.fchmod(fd, 0o600)  # private, also when an older agent created it
    finally:
        os.close(fd)
    read_end, write_end = os.pipe()
    try:
        writer = subprocess.Popen(
            [sys.executable, "-I", WRITER, "--max-bytes", str(log.max_bytes), "--keep", str(log.keep), str(log_path)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=server_environment(os.environ),
            start_new_session=True,  # a signal to the agent's terminal or group does not cut a server's log short
        )
        try:
            process = subprocess.Popen(
                launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.STDOUT,
                cwd=launch.cwd,
                env={**server_environment(os.environ, launch.env, env_allow or ()), **(mark or {})},
                start_new_session=True,
                # SIGPIPE stays ignored, as in the agent: if its log writer dies, the server's writes fail
                # (EPIPE) and it serves on, where the default action would kill it mid-request.
                restore_signals=False,
            )
        except BaseException:
            os.close(write_end)
            write_end = -1
            with contextlib.suppress(subprocess.TimeoutExpired):
                writer.wait(timeout=2)  # it sees the end of its input at once
            raise
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    started = psutil.Process(process.pid)
    create_time = started.create_time()
    # The command line as the OS reports it (a script's interpreter included): what adoption compares later.
    try:
        argv = started.cmdline() or launch.argv
    except psutil.Error:
        argv = launch.argv
    state = (mark or {}).get(STATE_ID, "")
    return Child(process.pid, port, argv, log_path, create_time, process, launch.health_path, writer, state)


def log_lost(child: Child) -> int | None:
    """The exit status of a log writer that ended (killed: it ignores SIGTERM) while its server runs on, so the
    server's output is lost until it restarts; told once, then the child forgets the writer. None otherwise."""
    writer = child.writer
    if writer is None or writer.poll() is None or not child.running():
        return None
    child.writer = None
    return writer.returncode


async def drain_log(child: Child, timeout: float = 2.0) -> None:
    """After the server exited: wait (briefly) until its writer has put the last lines in the log."""
    writer = child.writer
    if writer is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await anyio.to_thread.run_sync(writer.wait, timeout)


async def healthy(child: Child, path: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the child answers 200 on ``path``, by default its own health path (its ``Launch.health_path``)."""
    url = f"http://127.0.0.1:{child.port}{child.health_path if path is None else path}"
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
    await drain_log(child)
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
    for process in (child.process, child.writer):
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
