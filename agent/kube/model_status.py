"""A Model's status: the facts of its file (size, GGUF header), where LLMKube keeps them.

Every host that reads the same file reads the same facts, so agents on several hosts never fight over them; the
facts are written once per change. The Model's ``phase`` is left to LLMKube's controller, which downloads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import load_shape
from agent.kube.calls import MERGE_PATCH, NotFound, Refused, Retry, call
from agent.kube.status import model_facts
from agent.sources.manifest import GROUP, VERSION
from agent.sources.units import ServingUnit

PLURAL = "models"


class ModelFacts:
    def __init__(self, custom: Any, retry: Retry, on_refused: Callable[[str], None] | None = None) -> None:
        self.custom, self.retry = custom, retry
        self.on_refused = on_refused or (lambda reason: None)
        self.written: dict[str, dict[str, Any]] = {}  # Model key -> the facts last written to its status

    async def write(self, unit: ServingUnit) -> None:
        """Patch the Model's status with its file's facts if they changed; errors are logged, never raised."""
        model = unit.model
        path = model.local_path() if model.format == "gguf" else None
        if path is None:
            return
        try:  # cached by path, size and mtime: the pre-flight has just read this header
            shape = await anyio.to_thread.run_sync(load_shape, path)
        except (GGUFError, OSError):
            return
        key, facts = f"{model.namespace}/{model.name}", model_facts(shape)
        if self.written.get(key) == facts:
            return
        try:
            done = await call(
                f"patch model {key}/status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, model.namespace, PLURAL, model.name, {"status": facts}, _content_type=MERGE_PATCH
                ),
                self.retry,
            )
        except NotFound:
            return
        except Refused as exc:  # logged; the same facts are not sent again
            self.on_refused(exc.reason)
            done = facts
        if done is not None:
            self.written[key] = facts
