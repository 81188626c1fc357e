"""Plugin registration and async hook calls.

pluggy does the specs, registration and entry-point discovery; calling is done here because pluggy cannot
await: an ``async def`` hookimpl returns a coroutine, which pluggy's ``firstresult`` would take as the answer.
Hooks are called in pluggy's order (last registered first, so third-party plugins come before the defaults).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, cast

import anyio.to_thread
import pluggy
import structlog

from agent import hookspecs
from agent.hookspecs import ENTRY_POINT_GROUP, PROJECT, Executor
from agent.settings import Setting

log = structlog.get_logger("metal_agent.plugins")
BUILTIN = ("agent.defaults", "plugins.llamacpp", "plugins.mlx", "plugins.cuda")


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    failures: dict[str, str] = field(default_factory=dict)  # entry point name -> why it could not load
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution version
    settings: dict[str, Any] = field(default_factory=dict)  # effective configuration, for register_executors

    def declared_settings(self) -> list[tuple[str, Setting]]:
        """(plugin name, setting) for every setting the plugins declare through ``agent_settings``."""
        found: list[tuple[str, Setting]] = []
        for impl in self.manager.hook.agent_settings.get_hookimpls():
            try:
                declared = cast("list[Setting]", impl.function())
                found += [(impl.plugin_name, setting) for setting in declared]
            except Exception as exc:  # a broken plugin must not take the agent down
                self.failures[impl.plugin_name] = f"agent_settings failed: {exc}"
        return found

    def executors(self) -> list[Executor]:
        found: list[Executor] = []
        arguments = {"register": found.append, "settings": self.settings}
        for impl in reversed(self.manager.hook.register_executors.get_hookimpls()):
            try:
                impl.function(**{name: arguments[name] for name in impl.argnames})
            except Exception as exc:  # a broken plugin must not take the agent down
                self.failures[impl.plugin_name] = f"register_executors failed: {exc}"
        return found

    async def first(self, hook_name: str, thread: bool = False, **kwargs: Any) -> Any:
        """The first non-None result, awaiting coroutines; exceptions propagate (the caller decides).

        ``thread``: call each implementation in a worker thread (hooks that read files, such as ``preflight``,
        must never hold up the event loop); a coroutine it returns is still awaited on the loop.
        """
        for impl in _call_order(self.manager, hook_name):
            call = functools.partial(impl.function, **{name: kwargs[name] for name in impl.argnames})
            result = await anyio.to_thread.run_sync(call) if thread else call()
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def each(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation; one that raises is logged and the others still run."""
        for impl in _call_order(self.manager, hook_name):
            try:
                result = impl.function(**{name: kwargs[name] for name in impl.argnames})
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning("plugin hook failed", plugin=impl.plugin_name, hook=hook_name, error=str(exc))


def _call_order(manager: pluggy.PluginManager, hook_name: str) -> list[Any]:
    impls: list[Any] = getattr(manager.hook, hook_name).get_hookimpls()
    return impls[::-1]


def load_plugins(extra: Iterable[object] = (), entry_points: bool = True) -> Plugins:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager)
    for module_name in BUILTIN:
        manager.register(__import__(module_name, fromlist=["_"]), name=module_name)
        plugins.versions[module_name] = "builtin"
    if entry_points:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                manager.register(entry.load(), name=entry.name)
                plugins.versions[entry.name] = entry.dist.version if entry.dist else "unknown"
            except Exception as exc:  # reported by `metal-agent plugins`, never fatal
                plugins.failures[entry.name] = f"{type(exc).__name__}: {exc}"
                log.warning("plugin failed to load", plugin=entry.name, error=str(exc))
    for plugin in extra:
        manager.register(plugin)
    return plugins
