"""The launchd plist and the systemd unit in config/: they parse and run `metal-agent run --config`."""

from __future__ import annotations

import plistlib
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.config.settings import SETTINGS

CONFIG = Path(__file__).parents[2] / "config"
GRACE_PERIOD = next(s.default for s in SETTINGS if s.name == "grace_period")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: sections, repeatable keys, comments, backslash continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for number, raw in enumerate(logical.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if heading := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(heading.group(1), {})
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            assert re.fullmatch(r"[A-Za-z]+", key.strip()), f"line {number}: bad key {key!r}"
            current.setdefault(key.strip(), []).append(value.strip())
        else:
            raise AssertionError(f"line {number}: not a section, a comment or key=value: {raw!r}")
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit() -> None:
    unit = parse_unit((CONFIG / "metal-agent.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/metal-agent") and argv[1:3] == ["run", "--config"] and argv[3].endswith(".toml")
    assert service["Restart"] == ["on-failure"] and seconds(service["RestartSec"][0]) > 0
    assert service["KillMode"] == ["mixed"] and service["RestartPreventExitStatus"] == ["2"]
    assert seconds(service["TimeoutStopSec"][0]) > GRACE_PERIOD + 5
    assert unit["Install"]["WantedBy"] == ["default.target"]
    assert "Description" in unit["Unit"]


def test_the_unit_parser_rejects_what_systemd_would() -> None:
    with pytest.raises(AssertionError, match="not a section"):
        parse_unit("[Service]\nExecStart /bin/true\n")
    assert parse_unit("[Service]\nEnvironment=A=1\nEnvironment=B=2\n")["Service"]["Environment"] == ["A=1", "B=2"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    binary = home / ".local" / "bin" / "metal-agent"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    unit = tmp_path / "metal-agent.service"
    unit.write_text((CONFIG / "metal-agent.service").read_text().replace("%h", str(home)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "metal-agent.service" in line]
    assert done.returncode == 0 and not problems, done.stderr


def test_launchd_plist() -> None:
    with (CONFIG / "dev.metal-agent.plist").open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist["Label"] == "dev.metal-agent"
    argv = plist["ProgramArguments"]
    assert argv[0].endswith("/metal-agent") and argv[1:3] == ["run", "--config"] and argv[3].endswith(".toml")
    assert all(Path(arg).is_absolute() for arg in (argv[0], argv[3]))  # launchd expands neither ~ nor $HOME
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}  # restart on failure only
    assert plist["RunAtLoad"] is True and plist["ThrottleInterval"] >= 10
    assert plist["ExitTimeOut"] > GRACE_PERIOD + 5
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_absolute() and plist[key].endswith(".log")
    assert "/opt/homebrew/bin" in plist["EnvironmentVariables"]["PATH"].split(":")
