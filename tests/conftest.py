"""Every test runs without the developer's own configuration: no config file, no METAL_AGENT_* variables."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def no_user_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    for name in list(os.environ):
        if name.startswith("METAL_AGENT_"):
            monkeypatch.delenv(name)
