"""Configuration: precedence flag > environment > TOML file > default, and errors that name file and key."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser, main
from agent.cli.cmd_run import config_from
from agent.config.loading import Config, ConfigError, all_settings, default_path, load, locate, resolve
from agent.config.settings import PATH, Setting, seconds
from agent.engine.pipeline import AgentConfig
from agent.engine.plugin_manager import load_plugins
from agent.estimate.preflight import Mode
from agent.hookspecs import hookimpl

SETTINGS_WITH_PLUGINS = all_settings(load_plugins(entry_points=False))


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def configured(argv: list[str], env: dict[str, str] | None = None) -> Config:
    args = build_parser().parse_args(["run", *argv])
    return load(args, SETTINGS_WITH_PLUGINS, env or {})


def error(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        configured(argv, env)
    return str(raised.value)


def test_defaults_without_any_source() -> None:
    config = configured([])
    assert config.file is None
    assert all(entry.source == "default" for entry in config.entries.values())
    assert config["api_port"] == 9464 and config["memory_fraction"] is None and config["mlock"] is False
    assert config["memory_check_mode"] is Mode.ENFORCE
    assert config["state_dir"] == Path("~/.local/state/metal-agent").expanduser()


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    file = write(
        tmp_path,
        """
        [api]
        port = 1111
        [memory]
        fraction = 0.5
        host_memory = "8Gi"
        [servers]
        grace_period = 3
        ports = "8100-8109"
        [executors.llamacpp]
        mlock = true
        """,
    )
    env = {"METAL_AGENT_API_PORT": "2222", "METAL_AGENT_MEMORY_FRACTION": "0.25", "METAL_AGENT_GRACE_PERIOD": "4.5"}
    config = configured(["--config", str(file), "--api-port", "3333", "--no-mlock", "--host-memory", "2Gi"], env)
    expected = {
        "api_port": (3333, "flag", "--api-port"),
        "mlock": (False, "flag", "--mlock"),
        "host_memory": (2 << 30, "flag", "--host-memory"),
        "memory_fraction": (0.25, "env", "METAL_AGENT_MEMORY_FRACTION"),
        "grace_period": (4.5, "env", "METAL_AGENT_GRACE_PERIOD"),
        "ports": (range(8100, 8110), "file", str(file)),
        "startup_timeout": (120.0, "default", "default"),
        "api_host": ("127.0.0.1", "default", "default"),
    }
    for name, (value, source, origin) in expected.items():
        entry = config.entries[name]
        assert (entry.value, entry.source, entry.origin) == (value, source, origin), name


def test_values_reach_the_agent_config(tmp_path: Path) -> None:
    file = write(tmp_path, '[memory]\ncheck_mode = "warn"\n[servers]\nunhealthy_after = 7\nbackoff_cap = 9\n')
    agent = config_from(configured(["--config", str(file), "--memory-fraction", "0.5", "--ports", "9000"]))
    assert agent.mode is Mode.WARN and agent.unhealthy_after == 7 and agent.backoff_cap == 9.0
    assert agent.memory_fraction == 0.5 and agent.ports == range(9000, 9001)


def test_every_setting_reaches_the_agent() -> None:
    """A declared setting nothing reads would be a silent no-op: each one is an AgentConfig field, or the code
    reads it by name (``args.NAME``, ``settings.get("NAME")``, ``config["NAME"]``)."""
    fields = set(AgentConfig.__dataclass_fields__)
    root = Path(__file__).parents[2]
    source = "\n".join(p.read_text() for d in ("agent", "plugins") for p in (root / d).rglob("*.py"))
    for s in SETTINGS_WITH_PLUGINS:
        if s.config_field in fields:
            continue
        reads = rf"args\.{s.name}\b|\[\"{s.name}\"\]|\.get\(\"{s.name}\""
        assert re.search(reads, source), f"setting {s.name} is declared but nothing reads it"
    names = [s.name for s in SETTINGS_WITH_PLUGINS]
    assert len(names) == len(set(names)) and len({s.dotted for s in SETTINGS_WITH_PLUGINS}) == len(names)


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    file = write(tmp_path / "etc", '[agent]\nmanifests = "manifests"\nstate_dir = "~/state"\n')
    config = configured(["--config", str(file)])
    assert config["manifests"] == tmp_path / "etc" / "manifests"
    assert config["state_dir"] == Path.home() / "state"
    assert configured(["--manifests", "here"], {})["manifests"] == Path("here")  # flags: the working directory


def test_config_file_location(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    assert default_path({"XDG_CONFIG_HOME": str(xdg)}) == xdg / "metal-agent" / "config.toml"
    assert default_path({}) == Path("~/.config/metal-agent/config.toml").expanduser()
    assert locate(None, {"XDG_CONFIG_HOME": str(xdg)}) is None  # no file at the default location: defaults
    (xdg / "metal-agent").mkdir(parents=True)
    default = write(xdg / "metal-agent", "[api]\nport = 4444\n")
    assert locate(None, {"XDG_CONFIG_HOME": str(xdg)}) == default
    other = write(tmp_path, "[api]\nport = 5555\n", "other.toml")
    assert locate(None, {"XDG_CONFIG_HOME": str(xdg), "METAL_AGENT_CONFIG": str(other)}) == other
    assert configured([], {"XDG_CONFIG_HOME": str(xdg)})["api_port"] == 4444
    with pytest.raises(ConfigError, match=r"^--config: .*missing.toml is not a file"):
        locate(tmp_path / "missing.toml", {})
    with pytest.raises(ConfigError, match=r"^METAL_AGENT_CONFIG: "):
        locate(None, {"METAL_AGENT_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[memory]\nfracton = 0.5", "unknown key memory.fracton (did you mean memory.fraction?)"),
        ("[memroy]\nfraction = 0.5", "unknown table memroy (did you mean memory?)"),
        ("[api]\nfraction = 0.5", "unknown key api.fraction (did you mean memory.fraction?)"),
        ("port = 9000", "unknown key port (did you mean api.port?)"),
        ("[executors.llamacp]\nmlock = true", "unknown table executors.llamacp (did you mean executors.llamacpp?)"),
        ("[executors.llamacpp]\nbinray = '/x'", "unknown key executors.llamacpp.binray (did you mean "),
        ("[nonsense]\nwhatever = 1", "unknown table nonsense"),
    ],
)
def test_unknown_keys_name_the_file_and_suggest(tmp_path: Path, toml: str, message: str) -> None:
    file = write(tmp_path, toml + "\n")
    assert error(["--config", str(file)]).startswith(f"{file}: {message}")


@pytest.mark.parametrize(
    ("toml", "key", "message"),
    [
        ('[api]\nport = "9464"', "api.port", 'expected integer 1-65535, got a string "9464"'),
        ("[api]\nport = 70000", "api.port", "70000 is out of range (1-65535)"),
        ("[api]\nport = true", "api.port", "got a boolean true"),
        ('[executors.llamacpp]\nmlock = "yes"', "executors.llamacpp.mlock", 'expected boolean, got a string "yes"'),
        ("[memory]\nfraction = nan", "memory.fraction", "not finite"),
        ("[memory]\nfraction = inf", "memory.fraction", "not finite"),
        ("[memory]\nfraction = 0", "memory.fraction", "out of range"),
        ("[memory]\nfraction = 1.5", "memory.fraction", "out of range"),
        ("[memory]\nfraction = true", "memory.fraction", "got a boolean"),
        ('[memory]\nhost_memory = "-1Gi"', "memory.host_memory", "negative"),
        ('[memory]\nhost_memory = "24GB"', "memory.host_memory", "not a Kubernetes quantity"),
        ("[memory]\nhost_memory = 0", "memory.host_memory", "more than zero"),
        ('[memory]\ncheck_mode = "strict"', "memory.check_mode", "not one of enforce, warn"),
        ("[servers]\ngrace_period = 0", "servers.grace_period", "out of range"),
        ("[servers]\nstartup_timeout = -5", "servers.startup_timeout", "out of range"),
        ("[servers]\nstartup_timeout = nan", "servers.startup_timeout", "out of range"),
        ("[servers]\nunhealthy_after = 1.5", "servers.unhealthy_after", "expected integer 1-1000, got a float 1.5"),
        ('[servers]\nports = "9000-8000"', "servers.ports", "outside 1-65535 or reversed"),
        ("[agent]\nstate_dir = ''", "agent.state_dir", "is not a path"),
        (
            "[executors.llamacpp]\nbinary = 'nowhere/llama-server'",
            "executors.llamacpp.binary",
            "nowhere/llama-server is not an executable file",
        ),
        ("[api]\nport = [1, 2]", "api.port", "got an array [1, 2]"),
        ("[memory]\nfraction = {a = 1}", "memory.fraction", "got a table"),
        ('[memory]\nfraction = "0.5"', "memory.fraction", 'expected fraction (0 < f <= 1), got a string "0.5"'),
        ("[servers]\nports = 1.5", "servers.ports", "got a float"),
    ],
)
def test_wrong_types_and_bad_values_name_the_file_and_key(tmp_path: Path, toml: str, key: str, message: str) -> None:
    file = write(tmp_path, toml + "\n")
    text = error(["--config", str(file)])
    assert text.startswith(f"{file}: {key}: ") and message in text, text


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path, "[api\nport = 1\n")
    assert error(["--config", str(file)]).startswith(f"{file}: not valid TOML: ")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METAL_AGENT_MEMORY_FRACTION": "NaN"}, "METAL_AGENT_MEMORY_FRACTION: nan is not finite"),
        ({"METAL_AGENT_MEMORY_FRACTION": "1.5"}, "METAL_AGENT_MEMORY_FRACTION: 1.5 is out of range"),
        ({"METAL_AGENT_MEMORY_FRACTION": "half"}, 'METAL_AGENT_MEMORY_FRACTION: "half" is not a number'),
        ({"METAL_AGENT_MLOCK": "maybe"}, 'METAL_AGENT_MLOCK: "maybe" is not a boolean'),
        ({"METAL_AGENT_API_PORT": "http"}, 'METAL_AGENT_API_PORT: "http" is not a whole number'),
        ({"METAL_AGENT_HOST_MEMORY": "-8Gi"}, "METAL_AGENT_HOST_MEMORY: "),
        ({"METAL_AGENT_API_PORT": "٩٠٠٠"}, "METAL_AGENT_API_PORT: "),  # Arabic-Indic digits: int() would take them
        ({"METAL_AGENT_MEMORY_FRACTION": "٠.٥"}, 'METAL_AGENT_MEMORY_FRACTION: "\\u0660.\\u0665" is not a number'),
        (
            {"METAL_AGENT_MEMORY_FRACTON": "0.5"},
            "METAL_AGENT_MEMORY_FRACTON: not a metal-agent setting (did you mean METAL_AGENT_MEMORY_FRACTION?)",
        ),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    assert error([], env).startswith(message)


def test_environment_booleans_and_empty_variables() -> None:
    assert configured([], {"METAL_AGENT_MLOCK": "YES"})["mlock"] is True
    assert configured([], {"METAL_AGENT_MLOCK": "off"})["mlock"] is False
    assert configured([], {"METAL_AGENT_LLAMA_SERVER": ""}).entries["llama_server"].source == "default"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-fraction", "0"], "--memory-fraction: 0 is out of range"),
        (["--memory-fraction", "inf"], "--memory-fraction: inf is not finite"),
        (["--host-memory", "-1"], "--host-memory: "),
        (["--grace-period", "nan"], "--grace-period: nan is out of range"),
        (["--ports", "x-1"], "--ports: 'x-1' is not a port range"),
    ],
)
def test_flag_errors_name_the_flag(argv: list[str], message: str) -> None:
    assert error(argv).startswith(message)


def test_a_bad_value_is_an_error_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    file = write(tmp_path, "[memory]\nfraction = 1.5\n")
    assert "memory.fraction" in error(["--config", str(file), "--memory-fraction", "0.5"])
    assert "METAL_AGENT_API_PORT" in error(["--api-port", "9000"], {"METAL_AGENT_API_PORT": "0"})


def test_run_refuses_bad_configuration_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write(tmp_path, "[memory]\nfraction = 1.5\n")
    (tmp_path / "manifests").mkdir()
    argv = ["run", "--config", str(file), "--manifests", str(tmp_path / "manifests")]
    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {file}: memory.fraction: 1.5 is out of range (expected a number with 0 < f <= 1)"]
    assert not (tmp_path / "state").exists()  # nothing was started or created
    missing = write(tmp_path, "[agent]\nmanifests = 'nowhere'\n", "missing.toml")
    assert main(["run", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: agent.manifests: {tmp_path / 'nowhere'} is not a directory\n"
    (tmp_path / "file").write_text("")
    assert (
        main(["run", "--manifests", str(tmp_path / "manifests"), "--state-dir", str(tmp_path / "file" / "state")]) == 2
    )
    assert capsys.readouterr().err.startswith(f"error: --state-dir: cannot create {tmp_path / 'file' / 'state'}: ")
    monkeypatch.setenv("METAL_AGENT_GRACE_PERIOD", "-1")
    assert main(["run", "--manifests", str(tmp_path / "manifests")]) == 2
    assert capsys.readouterr().err.startswith("error: METAL_AGENT_GRACE_PERIOD: -1 is out of range")


class ExamplePlugin:
    """A third-party plugin with its own table: checked like the agent's own, values passed to its executors."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    @hookimpl
    def agent_settings(self) -> list[Setting]:
        return [
            Setting("example_model_dir", "executors.example", "model_dir", PATH, "/models", "where models are"),
            Setting("example_warmup", "executors.example", "warmup", seconds(0, 60), 5.0, "warm-up seconds"),
        ]

    @hookimpl
    def register_executors(self, register: Any, settings: dict[str, Any]) -> None:
        self.seen = dict(settings)


def test_a_plugin_declares_and_validates_its_own_table(tmp_path: Path) -> None:
    plugin = ExamplePlugin()
    plugins = load_plugins(extra=[plugin], entry_points=False)
    settings = all_settings(plugins)
    example = [s for s in settings if s.section == "executors.example"]
    assert [s.flag for s in example] == [False, False]  # flags are built before third-party plugins load
    file = write(tmp_path, "[executors.example]\nmodel_dir = 'models'\n")
    config = resolve(settings, file, {"METAL_AGENT_EXAMPLE_WARMUP": "2"})
    plugins.settings = config.values()
    executors = {type(e).__name__: e for e in plugins.executors()}
    assert plugin.seen["example_model_dir"] == tmp_path / "models" and plugin.seen["example_warmup"] == 2.0
    assert plugin.seen["mlock"] is False
    bad = write(tmp_path, "[executors.example]\nwarmup = 61\nmodel_dri = 'x'\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"unknown key executors.example.model_dri \(did you mean "):
        resolve(settings, bad, {})
    with pytest.raises(ConfigError, match=r"executors.example.warmup: 61 is out of range"):
        resolve(settings, write(tmp_path, "[executors.example]\nwarmup = 61\n", "b.toml"), {})
    assert "LlamaCppExecutor" in executors


def test_llamacpp_executors_take_their_settings(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    plugins = load_plugins(entry_points=False)
    file = write(tmp_path, f"[executors.llamacpp]\nbinary = '{binary}'\nmlock = true\n")
    plugins.settings = resolve(all_settings(plugins), file, {}).values()
    executors = {e.name: e for e in plugins.executors()}
    for name in ("llamacpp", "cuda"):
        executor: Any = executors[name]
        assert executor.binary == str(binary) and executor.options.mlock is True
