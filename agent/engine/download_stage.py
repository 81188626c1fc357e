"""A unit's model files in the pipeline: located and sized first, downloaded only once the unit is admitted.

A remote model (an ``https://`` or ``hf://`` source) is sized from its GGUF header, fetched with a few range
requests, before anything else: budget, pre-flight and admission judge it like a local file, so a model that can
never fit is refused without a byte of its weights downloaded. The download itself comes after admission and
holds the unit's reservation meanwhile: the server starts as soon as it is complete, and a unit still waiting for
memory downloads nothing yet.

While it downloads the unit is ``Downloading`` with a ``download`` block (bytes done and total); a change of spec,
a deletion or a suspension cancels it (the partial file stays, and a later download resumes it). Network trouble
retries with backoff; a refused source, a wrong checksum or a full disk fails the unit until its spec changes.
The fetching itself, shared by every unit with the same source, is agent/engine/model_fetch.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.engine.model_fetch import cancellable, download_status, failure_status
from agent.engine.unit_state import UnitRuntime
from agent.models.download import DownloadError, Progress
from agent.models.model_store import ModelFiles, SourceError
from agent.sources.units import ServingUnit

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent


class DownloadStage:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def locate(self, runtime: UnitRuntime, unit: ServingUnit) -> ModelFiles | None:
        """The unit's model files, a remote model sized from its headers; None (the unit's status says why) when
        its source is refused or cannot be read."""
        fetcher = self.agent.fetcher
        try:
            files = fetcher.files(unit.model)
            await fetcher.plan(files)  # a remote model is sized from its header before any download
        except (SourceError, DownloadError) as exc:
            self.agent.metrics.rejected(exc.reason)
            await self._failed(runtime, exc)
            return None
        return files

    async def fetch(self, runtime: UnitRuntime, unit: ServingUnit, files: ModelFiles) -> bool:
        """Fetch a remote model while holding its reservation; False (memory released) when it did not finish."""
        agent = self.agent

        async def report(records: list[Progress], publish: bool) -> None:
            runtime.download, runtime.message = download_status(records), "; ".join(p.text() for p in records)
            if publish:  # the first time and every log interval: logs and report hooks; the API sees every update
                await agent.set_status(runtime, "Downloading", "Downloading", runtime.message)

        try:
            fetch = lambda: agent.fetcher.fetch(files, unit.model.sha256, report)  # noqa: E731
            done = await cancellable(fetch, runtime, unit, lambda: agent.current_unit(runtime.key)[0])
        except DownloadError as exc:
            done = await self._failed(runtime, exc)
        if not done:
            agent.memory.release(runtime.key)
        runtime.download = None
        return done

    async def _failed(self, runtime: UnitRuntime, exc: SourceError | DownloadError) -> bool:
        config = self.agent.config
        phase, message = failure_status(exc, runtime, config.backoff_base, config.backoff_cap)
        await self.agent.set_status(runtime, phase, exc.reason, message)
        return False
