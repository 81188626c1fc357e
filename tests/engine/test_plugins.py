"""Plugins: called through pluggy (wrappers, order, check_pending), async hooks awaited, a broken plugin failing
alone and listed by `metal-agent plugins`, third-party executors from entry points, none leaking into the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess, manifest
from fake_servers import FakeServer

from agent.config.loading import PLUGIN_AUTOLOAD_ENV, all_settings
from agent.config.settings import BOOLEAN, Setting
from agent.engine.plugin_manager import load_plugins
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.hookspecs import Executor, hookimpl

EXAMPLE = Path(__file__).parents[1] / "example_plugin"
BUILTIN_EXECUTORS = ["cuda", "mlx", "llamacpp"]


class AsyncBudget:
    @hookimpl
    async def resolve_budget(self, unit: object, host: object, agent_fraction: object) -> str:
        return "from-async-plugin"


class AsyncNone:
    """Asked first (registered last); its awaited None leaves the answer to the plugins after it."""

    def __init__(self) -> None:
        self.asked = 0

    @hookimpl
    async def resolve_budget(self, unit: object, host: object, agent_fraction: object) -> None:
        self.asked += 1


class Wrapper:
    """Sees every call; replaces a synchronous answer (an async one reaches it still to be awaited)."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl(wrapper=True)
    def resolve_budget(self, unit: object, host: object, agent_fraction: object) -> Generator[None, Any, Any]:
        result = yield
        self.seen.append(result)
        return f"wrapped {result}" if isinstance(result, str) else result


class BrokenReporter:
    @hookimpl
    def report(self, unit: object, status: dict[str, Any]) -> None:
        raise RuntimeError("reporter is down")


class BrokenAsyncReporter:
    @hookimpl
    async def report(self, unit: object, status: dict[str, Any]) -> None:
        raise RuntimeError("async reporter is down")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    async def report(self, unit: object, status: dict[str, Any]) -> None:
        self.seen.append(status)


class AsyncExecutors:
    @hookimpl
    async def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("async-one"))
        register(FakeServer("async-two"))


class SyncExecutors:
    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("sync"))


class Misspelled:
    @hookimpl
    def register_executor(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("never"))


class Clash:
    @hookimpl
    def agent_settings(self) -> list[Setting]:
        return [Setting("own", "executors.clash", "own", BOOLEAN, False, "fine"),
                Setting("mlock", "executors.clash", "mlock", BOOLEAN, False, "llamacpp's already")]  # fmt: skip

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("clash"))


class Reserved:
    @hookimpl
    def agent_settings(self) -> list[Setting]:
        return [Setting("config", "executors.other", "config", BOOLEAN, False, "the config file?")]


class NotSettings:
    @hookimpl
    def agent_settings(self) -> Any:
        return {"mlock": True}


class RaisingRegistration:
    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("half"))
        raise RuntimeError("no licence")


@pytest.mark.anyio
async def test_async_hooks_are_awaited_and_plugins_come_before_the_defaults() -> None:
    plugins = load_plugins(extra=[AsyncBudget()], entry_points=False)
    assert await plugins.first("resolve_budget", unit=None, host=None, agent_fraction=None) == "from-async-plugin"


@pytest.mark.anyio
async def test_an_async_none_leaves_the_answer_to_the_plugins_after_it() -> None:
    first_asked = AsyncNone()
    plugins = load_plugins(extra=[AsyncBudget(), first_asked], entry_points=False)
    assert await plugins.first("resolve_budget", unit=None, host=None, agent_fraction=None) == "from-async-plugin"
    assert first_asked.asked == 1


@pytest.mark.anyio
async def test_wrappers_run_around_the_implementations() -> None:
    wrapper = Wrapper()
    plugins = load_plugins(extra=[wrapper, AsyncBudget()], entry_points=False)
    answer = await plugins.first("resolve_budget", unit=None, host=None, agent_fraction=None)
    assert len(wrapper.seen) == 1  # the wrapper saw the call
    assert answer == "from-async-plugin"


@pytest.mark.anyio
async def test_a_wrapper_may_replace_a_synchronous_answer() -> None:
    class Sync:
        @hookimpl
        def resolve_budget(self, unit: object, host: object, agent_fraction: object) -> str:
            return "sync"

    wrapper = Wrapper()
    plugins = load_plugins(extra=[wrapper, Sync()], entry_points=False)
    assert await plugins.first("resolve_budget", unit=None, host=None, agent_fraction=None) == "wrapped sync"
    assert wrapper.seen == ["sync"]


@pytest.mark.anyio
async def test_a_failing_reporter_does_not_stop_the_others() -> None:
    recorder = Recorder()
    plugins = load_plugins(extra=[recorder, BrokenReporter(), BrokenAsyncReporter()], entry_points=False)
    await plugins.each("report", unit=None, status={"phase": "Ready"})
    assert recorder.seen == [{"phase": "Ready"}]


@pytest.mark.anyio
async def test_a_reporter_registered_on_the_manager_directly_is_isolated_too() -> None:
    """The Kubernetes reporter registers itself after loading; its failures must not stop other reporters."""
    recorder = Recorder()
    plugins = load_plugins(extra=[recorder], entry_points=False)
    plugins.manager.register(BrokenReporter(), name="late")
    await plugins.each("report", unit=None, status={"phase": "Ready"})
    assert recorder.seen == [{"phase": "Ready"}]


def test_async_register_executors_registers_in_pluggy_order() -> None:
    plugins = load_plugins(extra=[AsyncExecutors(), SyncExecutors()], entry_points=False)
    names = [e.name for e in plugins.executors()]
    assert names == ["sync", "async-one", "async-two", *BUILTIN_EXECUTORS]


@pytest.mark.anyio
async def test_async_register_executors_works_inside_a_running_event_loop() -> None:
    plugins = load_plugins(extra=[AsyncExecutors()], entry_points=False)
    assert [e.name for e in plugins.executors()][:2] == ["async-one", "async-two"]


def test_a_misspelled_hook_fails_its_plugin_with_a_suggestion() -> None:
    plugins = load_plugins(extra=[Misspelled(), SyncExecutors()], entry_points=False)
    (name, why), = plugins.failures.items()  # fmt: skip
    assert why == "unknown hook register_executor (did you mean register_executors?)"
    assert plugins.manager.get_plugin(name) is None
    assert [e.name for e in plugins.executors()] == ["sync", *BUILTIN_EXECUTORS]
    plugins.manager.check_pending()  # what is left validates


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        (Clash(), r"setting mlock \(executors.clash.mlock\) is already declared by plugins.llamacpp"),
        (Reserved(), r"setting name config is reserved"),
        (NotSettings(), r"agent_settings must return a list of Setting, not dict"),
        (RaisingRegistration(), r"register_executors failed: RuntimeError: no licence"),
    ],
)
def test_a_plugin_with_bad_settings_or_a_raising_hook_fails_alone(plugin: object, why: str) -> None:
    plugins = load_plugins(extra=[plugin], entry_points=False)
    executors = [e.name for e in plugins.executors()]
    (reason,) = plugins.failures.values()
    assert re.search(why, reason), reason
    assert executors == BUILTIN_EXECUTORS  # nothing of the failed plugin, everything of the others
    assert not [s for s in all_settings(plugins) if s.section in ("executors.clash", "executors.other")]


# --- third-party plugins installed through entry points ----------------------------------------------------


def add_distribution(site: Path, name: str, module: str, code: str) -> None:
    """An installed distribution named ``name`` whose module ``module`` is one entry point plugin."""
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[metal_agent.executors]\n{module} = {module}\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, really built and installed (offline) into its own site directory, beside broken ones."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300, cwd=target,
    )  # fmt: skip
    broken = target / "broken_plugin-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text("[metal_agent.executors]\nbroken = no_such_module_here\n")
    add_distribution(target, "clashing-plugin", "clashing", """
        from agent.plugin import BOOLEAN, Setting, hookimpl
        @hookimpl
        def agent_settings():
            return [Setting("mlock", "executors.clashing", "mlock", BOOLEAN, False, "taken by llamacpp")]
    """)  # fmt: skip
    add_distribution(target, "typo-plugin", "typo", """
        from agent.plugin import hookimpl
        @hookimpl
        def resolve_budgets(unit, host, agent_fraction):
            return None
    """)  # fmt: skip
    add_distribution(target, "raising-plugin", "raising", """
        from agent.plugin import hookimpl
        @hookimpl
        def agent_settings():
            raise ValueError("cannot read my licence")
    """)  # fmt: skip
    return target


def metal_agent(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(site)},
    )  # fmt: skip


def test_third_party_executor_is_listed_and_broken_plugins_are_reported(
    installed: Path, entry_point_plugins: None
) -> None:
    done = metal_agent(installed, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert {"name": "example", "version": "0.1.0"} in info["plugins"]
    assert [e["name"] for e in info["executors"]] == ["example", *BUILTIN_EXECUTORS]
    example_setting = {"plugin": "example", "key": "executors.example.threads", "env": "METAL_AGENT_EXAMPLE_THREADS"}
    assert {**example_setting, "flag": None} in info["settings"]
    failed = info["failed"]
    assert "no_such_module_here" in failed["broken"]
    assert failed["clashing"] == "setting mlock (executors.clashing.mlock) is already declared by plugins.llamacpp"
    assert failed["typo"] == "unknown hook resolve_budgets (did you mean resolve_budget?)"
    assert failed["raising"] == "agent_settings failed: ValueError: cannot read my licence"
    assert not {"clashing", "typo", "raising"} & {p["name"] for p in info["plugins"]}
    text = metal_agent(installed, "plugins").stdout
    assert "failed to load clashing: setting mlock" in text


def test_broken_plugins_do_not_stop_the_configuration_from_loading(installed: Path, entry_point_plugins: None) -> None:
    """A setting clash used to make every command that reads the configuration (run included) exit 2."""
    done = metal_agent(installed, "config", "show", "--json")
    assert done.returncode == 0, done.stderr
    assert "executors.llamacpp.mlock" in json.loads(done.stdout)["settings"]


def test_installed_plugins_stay_out_of_the_suite(installed: Path) -> None:
    assert os.environ[PLUGIN_AUTOLOAD_ENV] == "1"  # set for every test by conftest
    info = json.loads(metal_agent(installed, "plugins", "--json").stdout)
    assert [p["name"] for p in info["plugins"]] == [
        "agent.engine.defaults",
        "plugins.llamacpp",
        "plugins.mlx",
        "plugins.cuda",
    ]
    assert info["failed"] == {}


@pytest.mark.llama
def test_third_party_executor_serves_a_model(installed: Path, tmp_path: Path, entry_point_plugins: None) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    text = manifest("ex", model).replace("spec: {modelRef: ex,", "spec: {modelRef: ex, runtime: example,")
    (manifests / "ex.yaml").write_text(text)
    process = AgentProcess(manifests, tmp_path / "state", env={"PYTHONPATH": str(installed)})
    try:
        process.wait(lambda: (process.unit("ex") or {}).get("phase") == "Ready")
        assert process.unit("ex")["executor"] == "example"  # type: ignore[index]
    finally:
        process.close()


def test_built_in_plugins_use_only_the_public_plugin_api() -> None:
    """plugins/ imports `agent.plugin` and nothing else of the agent, as a third-party plugin would."""
    import ast

    for path in sorted((Path(__file__).parents[2] / "plugins").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        internal = [name for name in imported if name.split(".")[0] == "agent" and name != "agent.plugin"]
        assert not internal, f"{path.name} imports {internal}"


def test_the_public_plugin_api_exports_what_it_lists() -> None:
    import agent.plugin

    assert sorted(agent.plugin.__all__) == sorted(set(agent.plugin.__all__))
    for name in agent.plugin.__all__:
        assert getattr(agent.plugin, name) is not None


def test_the_plugin_guide_is_built_from_the_hook_specs_and_the_example() -> None:
    """docs/plugins.md documents every hook and every name of agent.plugin, and shows the example verbatim."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    import plugin_docs

    page = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    assert page == plugin_docs.render(), "docs/plugins.md is out of date: run python scripts/plugin_docs.py"
    for name in plugin_docs.specified():
        assert f"`{name}" in page


def test_the_example_plugin_is_short() -> None:
    """Under 50 lines of code (docstrings, comments and blank lines not counted)."""
    import ast

    source = (EXAMPLE / "metal_agent_example.py").read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node):
            docstrings.update(range(node.body[0].lineno, (node.body[0].end_lineno or 0) + 1))
    lines = source.splitlines()
    code = [n for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    assert len([n for n in code if n not in docstrings]) < 50
