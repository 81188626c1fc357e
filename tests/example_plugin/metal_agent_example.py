"""An example executor: serves GGUF models whose InferenceService says ``runtime: example``.

It runs llama.cpp's server from the xllamacpp wheel; a real plugin would start its own server here.
Everything it needs comes from ``agent.plugin``, metal-agent's public plugin API.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.plugin import Executor, Launch, ServingUnit, Setting, hookimpl, integer


class ExampleExecutor:
    name = "example"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def accepts(self, unit: ServingUnit) -> str | None:
        """None when this executor serves the unit, else the reason it does not."""
        if unit.service.runtime != "example":
            return "runtime is not 'example'"
        return None

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        settings = unit.settings  # context, slots and cache types the budget was checked against
        argv = [
            sys.executable, "-m", "plugins.xllamacpp_server", "--model", str(model_path), "--port", str(port),
            "--ctx-size", str(settings.ctx_size), "--parallel", str(settings.parallel),
            "--cache-type-k", settings.cache_type_k, "--cache-type-v", settings.cache_type_v,
            "--threads", str(self.threads),
        ]  # fmt: skip
        return Launch(argv=argv, health_path="/health")


@hookimpl
def agent_settings() -> list[Setting]:
    """[executors.example] threads = N in the config file, or METAL_AGENT_EXAMPLE_THREADS."""
    return [Setting("example_threads", "executors.example", "threads", integer(1, 256), 2, "server threads")]


@hookimpl
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    register(ExampleExecutor(threads=settings.get("example_threads") or 2))
