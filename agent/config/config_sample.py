"""The commented sample config file, written from the settings table so it can never fall behind it.

Keys with a default are set to it; keys without one (and relative paths, which a file would take relative to
itself) are commented out, with an example value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.config.loading import PRECEDENCE
from agent.config.settings import SECTION_TITLES, Setting, toml_value

HEADER = f"""\
# metal-agent configuration (TOML). Every key is listed with its default.
#
# Read by `metal-agent run --config PATH`; without --config, from $METAL_AGENT_CONFIG, else
# $XDG_CONFIG_HOME/metal-agent/config.toml (~/.config/metal-agent/config.toml).
# Precedence: {PRECEDENCE}.
# `metal-agent config show` prints the effective value of every key and where it came from.
#
# Sizes are Kubernetes quantities: binary Ki Mi Gi Ti (64Gi), decimal k M G T (64G), bytes, or 1e9.
# Relative paths are taken relative to this file's directory; ~ is the home directory.
# Unknown keys, wrong types and out-of-range values stop the agent at start (exit status 2).
#
# Written by `metal-agent config sample`; tests/test_config_sample.py keeps it in step with the settings.
"""


def commented_out(setting: Setting) -> bool:
    default = setting.default
    return default is None or (setting.kind.is_path and not Path(default).expanduser().is_absolute())


def render_sample(settings: Sequence[Setting]) -> str:
    lines = [HEADER.rstrip("\n")]
    sections: dict[str, list[Setting]] = {}
    for setting in settings:
        sections.setdefault(setting.section, []).append(setting)
    for section, members in sections.items():
        lines += ["", f"[{section}]"]
        kind, _, plugin = section.partition(".")
        title = SECTION_TITLES.get(section) or (f"The {plugin} executor plugin." if kind == "executors" else "")
        if title:
            lines.append(f"# {title}")
        for s in members:
            lines.append("")
            lines.append(f"# {s.help}")
            lines.append(f"# ({s.kind.name}; flag {s.flag_name}, environment {s.env})" if s.flag else f"# ({s.env})")
            if s.default is None:
                lines.append(f"# {s.key} = {toml_value(s.example)}")
            elif commented_out(s):
                lines.append(f"# {s.key} = {toml_value(s.default)}  # default, relative to the working directory")
            else:
                lines.append(f"{s.key} = {toml_value(s.default)}")
    return "\n".join(lines) + "\n"
