"""A `metal-agent run` process for end-to-end tests: start it on a manifest directory, read its API, stop it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.processes.ports import free_port

API_VERSION = "inference.llmkube.dev/v1alpha1"
POLL_SECONDS = 0.1


def manifest(name: str, source: Path, budget: str = "512Mi", ctx: int = 2048) -> str:
    return (
        f"apiVersion: {API_VERSION}\nkind: Model\nmetadata: {{name: {name}}}\n"
        f"spec:\n  source: {source}\n  hardware: {{accelerator: cpu, memoryBudget: '{budget}'}}\n---\n"
        f"apiVersion: {API_VERSION}\nkind: InferenceService\nmetadata: {{name: {name}}}\n"
        f"spec: {{modelRef: {name}, contextSize: {ctx}}}\n"
    )


class AgentProcess:
    def __init__(self, manifests: Path, state: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        if "--kube" in extra and "--proxy-port" not in extra:  # not the default 9465: a real agent may hold it
            extra = (*extra, "--proxy-port", str(free_port()))
        self.log = (state.parent / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--manifests", str(manifests), "--state-dir", str(state),
             "--api-port", str(self.port), "--poll-interval", "0.2", "--startup-timeout", "30",
             "--grace-period", "3", "--model-root", str(state.parent), "--model-store", str(state.parent / "store"),
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=2) as response:
            result: dict[str, Any] = json.load(response)
            return result

    def unit(self, name: str) -> dict[str, Any] | None:
        return next((u for u in self.status()["units"] if u["unit"] == f"default/{name}"), None)

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the agent exited"
            try:
                if predicate():
                    return
            except OSError:
                pass
            time.sleep(POLL_SECONDS)  # between checks of the condition
        raise AssertionError(f"condition not met within {timeout} s; status: {self.status()}")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        """Stop the agent the way an operator does (SIGTERM); kill whatever is left if it does not comply."""
        if self.proc.poll() is None:
            children = self.children()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for child in children:
                if child.is_running():
                    child.kill()
        self.log.close()


def llama_children(process: AgentProcess | None = None) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "plugins.xllamacpp_server" in cmdline:
            found.append(proc)
    return found


def ready(process: AgentProcess, name: str) -> Callable[[], bool]:
    return lambda: (process.unit(name) or {}).get("phase") == "Ready"
