"""Plugin loading and hook calls, through pluggy.

pluggy registers the plugins, checks them against the hook specifications (``check_pending`` after loading, so a
misspelled hook name is found), orders them (last registered first, so third-party plugins come before the
built-in ones; ``tryfirst`` and ``trylast`` count) and calls them, wrappers included. Two things pluggy does not
do are added here, each in one place:

- A broken plugin fails alone. One that cannot be imported, does not validate, declares a setting the agent or
  an earlier plugin already has, or raises in ``agent_settings`` or ``register_executors`` is unregistered and
  kept in ``failures`` with the reason, which ``metal-agent plugins`` lists. A ``report`` implementation that
  raises is logged and the others still run; ``resolve_budget`` and ``preflight`` raise to the pipeline, which
  fails that unit with the message.
- Hooks may be ``async def``. pluggy cannot await, so each implementation is wrapped when it is registered: an
  async one hands pluggy a ``Pending`` (its coroutine and its plugin) instead of a value. ``first`` awaits it,
  and where that gives None asks the implementations after it (a second pluggy call without the plugins asked
  already: wrappers see both calls); ``each`` awaits every one; the load-time hooks run theirs to completion on
  an event loop of their own, because they are called before the agent has a loop, or inside one.

Plugins installed in the environment load through the ``metal_agent.executors`` entry points unless
``$METAL_AGENT_DISABLE_PLUGIN_AUTOLOAD`` is set (the test suite sets it: an installed plugin must not change it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import anyio.to_thread
import pluggy

from agent import hookspecs
from agent.config.loading import NOT_SETTINGS, PLUGIN_AUTOLOAD_ENV
from agent.config.settings import ENV_PREFIX, SETTINGS, Setting
from agent.hookspecs import ENTRY_POINT_GROUP, PROJECT, Executor


def _log() -> Any:
    """The plugins' logger; structlog is imported on first use, not with the module (short commands start faster)."""
    import structlog

    return structlog.get_logger("metal_agent.plugins")


BUILTIN = ("agent.engine.defaults", "plugins.llamacpp", "plugins.mlx", "plugins.cuda")
LOAD_TIME_HOOKS = frozenset({"agent_settings", "register_executors"})  # one that raises fails its plugin
_ADAPTED = "_metal_agent_adapted"  # set on an implementation's wrapper


@dataclass(frozen=True)
class Pending:
    """What an ``async def`` implementation hands pluggy: its awaitable, for the caller to await."""

    plugin: object
    plugin_name: str
    awaitable: Awaitable[Any]


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    failures: dict[str, str] = field(default_factory=dict)  # plugin name -> why it does not take part
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution version
    settings: dict[str, Any] = field(default_factory=dict)  # effective configuration, for register_executors
    declared: list[tuple[str, Setting]] = field(default_factory=list)  # (plugin, setting), checked at load
    _calling: str = ""  # the plugin whose load-time implementation runs now (whose executors register)
    _answers: dict[str, Any] = field(default_factory=dict)  # plugin -> its answer to the load-time hook
    _broken: dict[str, str] = field(default_factory=dict)  # plugin -> why its load-time implementation failed

    def declared_settings(self) -> list[tuple[str, Setting]]:
        """(plugin name, setting) for every setting the working plugins declare through ``agent_settings``.
        Only the built-in plugins' settings have flags: the parsers are built before other plugins load."""
        return [
            (plugin, setting if self.versions.get(plugin) == "builtin" else dataclasses.replace(setting, flag=False))
            for plugin, setting in self.declared
            if plugin not in self.failures
        ]

    def executors(self) -> list[Executor]:
        """Every plugin's executors, in the order they are asked (third-party plugins first)."""
        order = _calling_order(self.manager, "register_executors")
        found: list[tuple[str, Executor]] = []
        self._call_at_load("register_executors", register=lambda e: found.append((self._calling, e)),
                           settings=self.settings)  # fmt: skip
        kept = [(plugin, executor) for plugin, executor in found if plugin not in self.failures]
        kept.sort(key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order))
        return [executor for _, executor in kept]

    async def first(self, hook_name: str, thread: bool = False, **kwargs: Any) -> Any:
        """The first answer that is not None, awaiting async ones; exceptions propagate (the caller decides).

        ``thread``: make the pluggy call in a worker thread (hooks that read files, such as ``preflight``, must
        never hold up the event loop); an async implementation's coroutine is still awaited on the loop.
        """
        caller = self._caller(hook_name)
        while True:
            call = functools.partial(caller, **kwargs)
            result = await anyio.to_thread.run_sync(call) if thread else call()
            if not isinstance(result, Pending):
                return result
            value = await result.awaitable
            if value is not None:
                return value
            order = _calling_order(self.manager, hook_name)  # ask the ones after it
            asked = [self.manager.get_plugin(name) for name in order[: order.index(result.plugin_name) + 1]]
            caller = self.manager.subset_hook_caller(hook_name, asked)

    async def each(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation; one that raises is logged and the others still run."""
        for result in self._caller(hook_name)(**kwargs):
            if isinstance(result, Pending):
                try:
                    await result.awaitable
                except Exception as exc:
                    _log().warning("plugin hook failed", plugin=result.plugin_name, hook=hook_name, error=str(exc))

    def fail(self, name: str, why: str) -> None:
        """Take a plugin out: unregistered, and listed with ``why`` by ``metal-agent plugins``."""
        self.failures[name] = why
        if self.manager.get_plugin(name) is not None:
            self.manager.unregister(name=name)
        _log().warning("plugin failed", plugin=name, error=why)

    def add(self, name: str | None, load: Callable[[], object], version: str) -> None:
        """Import (``load``) and register one plugin; any failure fails it alone."""
        try:
            plugin = load()
            registered = self.manager.register(plugin, name=name)
        except Exception as exc:  # ImportError, a hook that does not match its spec, a name taken...
            self.fail(name or "unnamed plugin", f"{type(exc).__name__}: {exc}")
            return
        if registered is None:
            return  # blocked
        self.versions[registered] = version

    def _caller(self, hook_name: str) -> Any:
        """The hook's caller, every implementation wrapped first (also those registered on ``manager`` directly,
        such as the Kubernetes reporter): async ones answer a ``Pending``, a failure is handled by its kind."""
        caller = getattr(self.manager.hook, hook_name)
        firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))
        for impl in caller.get_hookimpls():
            if not (impl.wrapper or impl.hookwrapper or getattr(impl.function, _ADAPTED, False)):
                self._adapt(impl, hook_name, firstresult)
        return caller

    def _adapt(self, impl: Any, hook_name: str, firstresult: bool) -> None:
        function, name = impl.function, impl.plugin_name

        def call(*args: Any, **kwargs: Any) -> Any:
            previous, self._calling = self._calling, name
            try:
                result = function(*args, **kwargs)
            except Exception as exc:
                if firstresult:
                    raise
                self._failed_in(name, hook_name, exc)
                return None
            finally:
                self._calling = previous
            if inspect.isawaitable(result):
                return Pending(impl.plugin, name, result)
            if hook_name in LOAD_TIME_HOOKS:
                self._answers[name] = result
            return result

        setattr(call, _ADAPTED, True)
        impl.function = call

    def _failed_in(self, name: str, hook_name: str, exc: Exception) -> None:
        if hook_name in LOAD_TIME_HOOKS:
            self._broken[name] = f"{hook_name} failed: {type(exc).__name__}: {exc}"
        else:
            _log().warning("plugin hook failed", plugin=name, hook=hook_name, error=str(exc))

    def _call_at_load(self, hook_name: str, **kwargs: Any) -> dict[str, Any]:
        """Each plugin's answer to a load-time hook, async ones run to completion; a plugin that raises fails."""
        self._answers, self._broken = {}, {}
        for result in self._caller(hook_name)(**kwargs):
            if isinstance(result, Pending):
                self._calling = result.plugin_name
                try:
                    self._answers[result.plugin_name] = _run_apart(result.awaitable)
                except Exception as exc:
                    self._failed_in(result.plugin_name, hook_name, exc)
                finally:
                    self._calling = ""
        for name, why in self._broken.items():
            self.fail(name, why)
        return {name: answer for name, answer in self._answers.items() if name not in self._broken}

    def check_pending(self) -> None:
        """pluggy's ``check_pending``: a plugin with a hook no spec names (a typo) fails, with a suggestion."""
        specs = [name for name, caller in vars(self.manager.hook).items() if caller.has_spec()]
        while True:
            try:
                self.manager.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.manager.get_name(exc.plugin) or "unnamed plugin"
                unknown = [
                    c.name for c in self.manager.get_hookcallers(exc.plugin) or [] if not c.has_spec()
                ]  # fmt: skip
                why = "; ".join(f"unknown hook {hook}{_did_you_mean(hook, specs)}" for hook in unknown)
                self.fail(name, why or str(exc))

    def declare_settings(self) -> None:
        """Collect ``agent_settings``, in registration order; a plugin whose names are taken fails alone."""
        answers = self._call_at_load("agent_settings")
        names = {s.name: "the agent" for s in SETTINGS}
        names |= {env.removeprefix(ENV_PREFIX).lower(): "reserved" for env in NOT_SETTINGS}  # METAL_AGENT_CONFIG
        places = {s.dotted: "the agent" for s in SETTINGS}
        for plugin, _ in self.manager.list_name_plugin():
            declared = answers.get(plugin) or []
            problem = _clash(declared, names, places)
            if problem:
                self.fail(plugin, problem)
                continue
            for setting in declared:
                names[setting.name], places[setting.dotted] = plugin, plugin
                self.declared.append((plugin, setting))


def _clash(declared: Any, names: dict[str, str], places: dict[str, str]) -> str:
    """Why a plugin's declared settings cannot be taken ("" when they can)."""
    if not isinstance(declared, list | tuple) or not all(isinstance(s, Setting) for s in declared):
        return f"agent_settings must return a list of Setting, not {type(declared).__name__}"
    for setting in declared:
        owner = names.get(setting.name) or places.get(setting.dotted)
        if owner == "reserved":
            return f"setting name {setting.name} is reserved"
        if owner:
            return f"setting {setting.name} ({setting.dotted}) is already declared by {owner}"
    return ""


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _calling_order(manager: pluggy.PluginManager, hook_name: str) -> list[str]:
    """Plugin names in the order pluggy calls their implementations of ``hook_name``."""
    impls = getattr(manager.hook, hook_name).get_hookimpls()
    return [impl.plugin_name for impl in reversed(impls) if not (impl.wrapper or impl.hookwrapper)]


def _run_apart(awaitable: Awaitable[Any]) -> Any:
    """Run an async load-time implementation to completion on an event loop of its own, in a thread: the caller
    may have no loop yet (the CLI) or be running inside one (an agent built by a test)."""
    import asyncio

    async def wait() -> Any:
        return await awaitable

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(wait())
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="metal-agent plugin loading")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _given(plugin: object) -> Callable[[], object]:
    return lambda: plugin


def load_plugins(extra: Iterable[object] = (), entry_points: bool | None = None) -> Plugins:
    """The built-in plugins, the installed ones (unless ``entry_points`` is False, or None with
    ``$METAL_AGENT_DISABLE_PLUGIN_AUTOLOAD`` set) and ``extra`` ones, each checked; failures kept, never raised."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager)
    for module_name in BUILTIN:
        plugins.add(module_name, functools.partial(importlib.import_module, module_name), "builtin")
    if entry_points is None:
        entry_points = not os.environ.get(PLUGIN_AUTOLOAD_ENV)
    if entry_points:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            plugins.add(entry.name, entry.load, entry.dist.version if entry.dist else "unknown")
    for plugin in extra:
        plugins.add(None, _given(plugin), "unknown")
    plugins.check_pending()
    plugins.declare_settings()
    return plugins
