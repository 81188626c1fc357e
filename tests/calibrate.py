"""Run real llama.cpp once and read back what it allocated.

The estimator's claims are only as good as their check against llama.cpp itself: the tests and the
benchmarks start the server (the ``llama-server`` binary or the xllamacpp stand-in) with given settings, wait
until it is healthy, and parse its memory report and its process footprint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.estimate.llama_memlog import LlamaMemoryReport, parse_memory_log
from agent.estimate.shape import ServeSettings
from agent.processes.ports import free_port
from plugins.llamacpp import ServerOptions, server_argv

STAND_IN = [sys.executable, "-m", "plugins.xllamacpp_server"]  # llama.cpp's server from the xllamacpp wheel


@dataclass(frozen=True)
class Measurement:
    report: LlamaMemoryReport
    rss_bytes: int  # resident set of the server process once healthy
    log: str


def measure(model: str | os.PathLike[str], settings: ServeSettings, timeout: float = 60.0) -> Measurement:
    """Start llama.cpp with ``settings``, wait for /health, read its memory, stop it."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            server_argv(STAND_IN, model, settings, port, ServerOptions(threads=2)),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,
        )
        try:
            _wait_healthy(proc, port, timeout)
            rss = psutil.Process(proc.pid).memory_info().rss
        finally:
            _stop(proc)
        log.seek(0)
        text = log.read()
    if proc.returncode not in (0, -signal.SIGTERM) and "server is listening" not in text:
        raise RuntimeError(f"llama.cpp exited with {proc.returncode}: {text[-2000:]}")
    return Measurement(report=parse_memory_log(text), rss_bytes=rss, log=text)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"llama.cpp was not healthy within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
