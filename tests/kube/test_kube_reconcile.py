"""The reporter's per-object worker (agent/kube/reconcile.py) with a scripted sync: one worker per object, the
latest change wins, backoff only after transient failures, nothing after a refusal until the next change."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from agent.kube.reconcile import Outcome, Reconciler

pytestmark = pytest.mark.anyio


class Script:
    """A sync that answers from a per-key plan and counts its calls; ``gate`` holds a call until released."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.answers: dict[str, Outcome] = {}
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()

    async def __call__(self, key: str) -> Outcome:
        self.calls[key] += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.answers.get(key, Outcome.DONE)


@asynccontextmanager
async def running(script: Script, **options: float) -> AsyncIterator[Reconciler]:
    reconciler = Reconciler(script, backoff_base=options.get("base", 0.05), backoff_cap=options.get("cap", 0.2))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reconciler.run, tasks)
        yield reconciler
        tasks.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.005)  # the polling interval of the condition


async def test_changes_during_a_sync_cost_one_more_sync_not_one_each() -> None:
    script = Script()
    script.gate = anyio.Event()
    async with running(script) as reconciler:
        reconciler.request("a")
        await script.started.wait()
        for _ in range(20):  # twenty changes while the first sync is in flight
            reconciler.request("a")
        script.gate.set()
        with anyio.fail_after(5):
            await reconciler.wait_idle()
        assert script.calls["a"] == 2 and list(reconciler.workers) == ["a"]


async def test_a_refusal_waits_for_the_next_change() -> None:
    script = Script()
    script.answers["a"] = Outcome.REFUSED
    async with running(script) as reconciler:
        reconciler.request("a")
        await until(lambda: script.calls["a"] == 1)
        with anyio.fail_after(5):
            await reconciler.wait_idle()
        await anyio.sleep(0.3)  # longer than any backoff: a refusal is not retried
        assert script.calls["a"] == 1 and reconciler.backing_off == []
        reconciler.request("a")
        await until(lambda: script.calls["a"] == 2)


async def test_transient_failures_back_off_and_the_worker_is_idle_meanwhile() -> None:
    script = Script()
    script.answers["a"] = Outcome.RETRY
    async with running(script, base=0.05, cap=0.1) as reconciler:
        reconciler.request("a")
        await until(lambda: script.calls["a"] == 1)
        with anyio.fail_after(5):
            await reconciler.wait_idle()  # backing off counts as idle: nothing to wait for now
        assert reconciler.backing_off == ["a"]
        await until(lambda: script.calls["a"] >= 3)
        script.answers["a"] = Outcome.DONE
        await until(lambda: reconciler.backing_off == [])  # the next try has begun
        with anyio.fail_after(5):
            await reconciler.wait_idle()  # and converged
        calls = script.calls["a"]
        await anyio.sleep(0.3)
        assert script.calls["a"] == calls  # converged: no more syncs


async def test_gone_ends_the_worker_and_a_later_change_starts_another() -> None:
    script = Script()
    script.answers["a"] = Outcome.GONE
    async with running(script) as reconciler:
        reconciler.request("a")
        await until(lambda: script.calls["a"] == 1 and not reconciler.workers)
        script.answers["a"] = Outcome.DONE
        reconciler.request("a")
        await until(lambda: script.calls["a"] == 2)
        assert list(reconciler.workers) == ["a"]


async def test_a_failing_sync_is_a_transient_failure_not_the_end_of_the_worker() -> None:
    calls = Counter[str]()

    async def broken(key: str) -> Outcome:
        calls[key] += 1
        if calls[key] == 1:
            raise RuntimeError("a bug")
        return Outcome.DONE

    reconciler = Reconciler(broken, backoff_base=0.01, backoff_cap=0.02)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reconciler.run, tasks)
        reconciler.request("a")
        await until(lambda: calls["a"] == 2)
        tasks.cancel_scope.cancel()
