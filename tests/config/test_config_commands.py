"""``metal-agent config show`` / ``config sample`` and ``plugins``: table and JSON, in-process and through the
real console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.cli import main

METAL_AGENT = Path(sys.executable).parent / "metal-agent"  # the installed console script


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["config", "show", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_show_table_names_each_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "config.toml"
    file.write_text('[api]\nport = 1111\n[memory]\nhost_memory = "64Gi"\n[executors.llamacpp]\nmlock = true\n')
    monkeypatch.setenv("METAL_AGENT_API_PORT", "2222")
    code, out, _ = show(capsys, "--config", str(file), "--memory-fraction", "0.5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"config file: {file}"
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[3:])}
    assert rows.pop("KEY") == ["VALUE", "SOURCE"]
    assert rows["api.port"] == ["2222", "env METAL_AGENT_API_PORT"]
    assert rows["memory.fraction"] == ["0.5", "flag --memory-fraction"]
    assert rows["memory.host_memory"] == ["68719476736 (64.0 GiB)", str(file)]
    assert rows["executors.llamacpp.mlock"] == ["true", str(file)]
    assert rows["servers.grace_period"] == ["10.0", "default"]
    assert rows["servers.ports"] == ["(unset)", "default"]


def test_show_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "config.toml"
    file.write_text('[servers]\nports = "8100-8199"\n[memory]\ncheck_mode = "warn"\n')
    code, out, _ = show(capsys, "--config", str(file), "--json", "--state-dir", str(tmp_path / "s"))
    result = json.loads(out)
    assert code == 0 and result["file"] == str(file)
    settings = result["settings"]
    assert settings["servers.ports"] == {
        "value": "8100-8199", "source": "file", "origin": str(file), "name": "ports", "env": "METAL_AGENT_PORTS",
        "flag": "--ports",
    }  # fmt: skip
    assert settings["memory.check_mode"]["value"] == "warn"
    assert settings["agent.state_dir"]["value"] == str(tmp_path / "s")
    assert settings["agent.state_dir"]["source"] == "flag"
    assert settings["memory.fraction"] == {**settings["memory.fraction"], "value": None, "source": "default"}
    assert settings["executors.llamacpp.binary"]["env"] == "METAL_AGENT_LLAMA_SERVER"


def test_show_reports_an_invalid_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[servers]\ngrace_perid = 5\n")
    code, out, err = show(capsys, "--config", str(file))
    assert code == 2 and not out
    assert err == f"error: {file}: unknown key servers.grace_perid (did you mean servers.grace_period?)\n"


def test_precedence_through_the_console_script(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[api]\nport = 1111\n[memory]\nfraction = 0.5\n[servers]\ngrace_period = 3\n")
    env = {**os.environ, "METAL_AGENT_MEMORY_FRACTION": "0.25", "METAL_AGENT_GRACE_PERIOD": "4"}
    done = subprocess.run(
        [str(METAL_AGENT), "config", "show", "--json", "--config", str(file), "--grace-period", "7"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    settings = json.loads(done.stdout)["settings"]
    sources = {key: (settings[key]["value"], settings[key]["source"]) for key in settings}
    assert sources["servers.grace_period"] == (7.0, "flag")
    assert sources["memory.fraction"] == (0.25, "env")
    assert sources["api.port"] == (1111, "file")
    assert sources["servers.startup_timeout"] == (120.0, "default")
    bad = subprocess.run(
        [str(METAL_AGENT), "config", "show", "--config", str(file)],
        capture_output=True, text=True, timeout=60, env={**env, "METAL_AGENT_GRACE_PERIOD": "0"},
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: METAL_AGENT_GRACE_PERIOD: 0 is out of range (seconds, 0 < s <= 3600)"]


def test_sample_command_prints_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "sample"]) == 0
    text = capsys.readouterr().out
    tomllib.loads(text)
    (tmp_path / "config.toml").write_text(text)
    code, out, _ = show(capsys, "--config", str(tmp_path / "config.toml"), "--json")
    settings = json.loads(out)["settings"]
    assert code == 0 and settings["api.port"] == {**settings["api.port"], "value": 9464, "source": "file"}


def test_config_without_an_action_shows_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 2
    assert "show" in capsys.readouterr().err


def test_plugins_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plugins:" and "  plugins.llamacpp  builtin" in lines
    executors = lines.index("executors (first that accepts a model wins):")
    assert [line.split()[0] for line in lines[executors + 1 : executors + 4]] == ["cuda", "mlx", "llamacpp"]
    assert "  [executors.llamacpp] binary, mlock, extra_args_allowed  (plugins.llamacpp)" in lines
    assert "  [executors.mlx] extra_args_allowed  (plugins.mlx)" in lines
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"name": "plugins.llamacpp", "version": "builtin"} in info["plugins"]
    assert [e["name"] for e in info["executors"]][-3:] == ["cuda", "mlx", "llamacpp"]
    assert {"plugin": "plugins.llamacpp", "key": "executors.llamacpp.mlock", "env": "METAL_AGENT_MLOCK",
            "flag": "--mlock"} in info["settings"]  # fmt: skip
    assert info["failed"] == {}


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from agent import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"metal-agent {__version__}"
    for command in ([], ["run"], ["status"], ["config", "show"], ["plugins"], ["estimate"]):
        assert main([*command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "exit status" in text, command
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Kubernetes quantities" in text and "memoryBudget > memoryFraction" in text
    assert "$METAL_AGENT_MEMORY_FRACTION" in text and "memory.fraction" in text
