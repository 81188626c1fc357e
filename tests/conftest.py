"""Shared fixtures: no developer configuration and no installed third-party plugin in any test (unless it asks for
`entry_point_plugins`); `kube_api`, the fake Kubernetes API server; `server`, a local HTTP server of model files
(tests/model_server.py), and `tiny`, the bytes of a tiny GGUF."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from kubeapi import KubeAPI
from model_server import ModelServer, serve

from agent.config.loading import PLUGIN_AUTOLOAD_ENV
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf


@pytest.fixture(autouse=True)
def no_user_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test runs without the developer's own configuration (no config file, no METAL_AGENT_* variables),
    never writes to the developer's model store, and loads only the built-in plugins: a plugin installed in the
    environment through an entry point must not change the suite's results (agents started as processes inherit
    the switch)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    for name in list(os.environ):
        if name.startswith("METAL_AGENT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(PLUGIN_AUTOLOAD_ENV, "1")


@pytest.fixture
def entry_point_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test loads the plugins installed through entry points, as a user's agent does."""
    monkeypatch.delenv(PLUGIN_AUTOLOAD_ENV)


@pytest.fixture
def kube_api() -> Iterator[KubeAPI]:
    # The fake server's own access log is test noise, and would mix into the stderr that CLI tests assert on.
    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.setLevel(logging.WARNING)
    try:
        with KubeAPI() as api:
            yield api
    finally:
        access.setLevel(level)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    yield from serve(ModelServer())


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return write_tiny_gguf(tmp_path / "src" / "tiny.gguf", TinyShape()).read_bytes()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path, Path]]:
    """A `metal-agent run` process on an empty manifest directory, two tiny models beside it, 64 MiB of budget."""
    manifests, models = tmp_path / "manifests", tmp_path / "models"
    manifests.mkdir()
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    write_tiny_gguf(models / "b.gguf", TinyShape(n_layer=2, n_embd=64), seed=1)
    process = AgentProcess(manifests, tmp_path / "state", "--host-memory", "16Gi", "--memory-fraction", "0.004")
    yield process, manifests, models
    process.close()
