"""The sample config file ``config/metal-agent.toml``: current with the settings table, complete, and the defaults."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

from agent.cli.setting_flags import flag_settings
from agent.config.config_sample import render_sample
from agent.config.loading import resolve

SAMPLE = Path(__file__).parents[2] / "config" / "metal-agent.toml"
SETTINGS = flag_settings()  # the agent's and the built-in plugins'
COMMENTED_KEY = re.compile(r"^# (\w+) = (.*)$")


def keys_by_section(text: str) -> dict[str, dict[str, str]]:
    """Every ``key = value`` line, commented out or not, under the table heading it follows."""
    found: dict[str, dict[str, str]] = {}
    section = ""
    for line in text.splitlines():
        if heading := re.fullmatch(r"\[([\w.]+)\]", line):
            section = heading.group(1)
        elif (match := COMMENTED_KEY.match(line)) or (match := re.match(r"^(\w+) = (.*)$", line)):
            found.setdefault(section, {})[match.group(1)] = match.group(2)
    return found


def test_sample_is_what_the_settings_table_writes() -> None:
    assert SAMPLE.read_text() == render_sample(SETTINGS), (
        "regenerate: metal-agent config sample > config/metal-agent.toml"
    )


def test_sample_lists_every_key_in_its_table() -> None:
    listed = keys_by_section(SAMPLE.read_text())
    expected: dict[str, set[str]] = {}
    for s in SETTINGS:
        expected.setdefault(s.section, set()).add(s.key)
    assert {section: set(keys) for section, keys in listed.items()} == expected


def test_sample_parses_and_yields_the_defaults() -> None:
    from_sample = resolve(SETTINGS, SAMPLE, {})
    defaults = resolve(SETTINGS, None, {})
    assert from_sample.values() == defaults.values()
    active = {f"{s}.{k}" for s, keys in tomllib.loads(SAMPLE.read_text()).items() for k in _flat(keys)}
    assert active == {e.setting.dotted for e in from_sample.entries.values() if e.source == "file"}
    assert {e.setting.name for e in from_sample.entries.values() if e.source == "default"} == {
        s.name for s in SETTINGS if s.default is None or s.name == "manifests"
    }


def _flat(table: dict[str, object], prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        keys += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def test_commented_examples_are_valid_values(tmp_path: Path) -> None:
    uncommented = "\n".join(line[2:] if COMMENTED_KEY.match(line) else line for line in SAMPLE.read_text().splitlines())
    example_binary = '"/opt/homebrew/bin/llama-server"'  # must exist to be valid: use one that does here
    assert example_binary in uncommented
    (tmp_path / "config.toml").write_text(uncommented.replace(example_binary, json.dumps(sys.executable)))
    config = resolve(SETTINGS, tmp_path / "config.toml", {})
    assert all(entry.source == "file" for entry in config.entries.values())
    assert config["manifests"] == tmp_path / "config" / "samples"  # relative to the file
    assert config["host_memory"] == 64 << 30 and config["memory_fraction"] == 0.75
