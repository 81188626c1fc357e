"""An example executor: serves GGUF models whose InferenceService says ``runtime: example``.

It runs llama.cpp's server from the xllamacpp wheel; a real plugin would start its own server here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agent.plugin import Executor, Launch, ServingUnit, hookimpl


class ExampleExecutor:
    name = "example"

    def accepts(self, unit: ServingUnit) -> str | None:
        """None when this executor serves the unit, else the reason it does not."""
        if unit.service.runtime != "example":
            return "runtime is not 'example'"
        return None

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        settings = unit.settings  # context, slots and cache types the budget was checked against
        argv = [
            sys.executable, "-m", "plugins.xllamacpp_server",
            "--model", str(model_path), "--port", str(port),
            "--ctx-size", str(settings.ctx_size), "--parallel", str(settings.parallel),
        ]  # fmt: skip
        return Launch(argv=argv, health_path="/health")


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(ExampleExecutor())
