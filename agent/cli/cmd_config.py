"""``metal-agent config show`` (the effective configuration, and where each value came from) and ``config sample``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.setting_flags import flag_settings
from agent.config.config_sample import render_sample
from agent.config.loading import (
    PRECEDENCE,
    Config,
    ConfigError,
    add_config_flag,
    add_setting_flags,
    all_settings,
    default_path,
    load,
)
from agent.engine.plugin_manager import load_plugins

EXIT_STATUS = """\
exit status:
  0  printed
  2  invalid flags or configuration: one line on stderr starting with `error:`
"""


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "config",
        help=help_line,
        description=f"Settings come from a TOML file, METAL_AGENT_* variables and flags: {PRECEDENCE}.",
    )
    actions = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="print every setting's effective value and where it came from",
        description=(
            "Print every setting's effective value and its source: default, the config file, an environment "
            f"variable or a flag ({PRECEDENCE}). Takes the same --config and setting flags as `run`, so it "
            "shows what `run` with them would use."
        ),
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flag(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(show, flag_settings())
    show.set_defaults(handler=run_show)
    sample = actions.add_parser(
        "sample",
        help="print a commented config file with every key and its default",
        description="Print a commented TOML config file listing every key (plugins' included) with its default.",
    )
    sample.set_defaults(handler=run_sample)
    p.set_defaults(handler=lambda _: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def to_json(config: Config) -> dict[str, Any]:
    settings = {}
    for entry in config.entries.values():
        s = entry.setting
        settings[s.dotted] = {
            "value": None if entry.value is None else s.kind.show(entry.value),
            "source": entry.source,
            "origin": entry.origin,
            "name": s.name,
            "env": s.env,
            "flag": s.flag_name if s.flag else None,
        }
    return {"file": str(config.file) if config.file else None, "precedence": PRECEDENCE, "settings": settings}


def _where(source: str, origin: str) -> str:
    return {"env": f"env {origin}", "flag": f"flag {origin}"}.get(source, origin)


def render(config: Config) -> str:
    file = str(config.file) if config.file else f"none ({default_path()} does not exist)"
    rows = [("KEY", "VALUE", "SOURCE")]
    for entry in config.entries.values():
        s = entry.setting
        value = "(unset)" if entry.value is None else s.kind.describe(entry.value)
        rows.append((s.dotted, value, _where(entry.source, entry.origin)))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"config file: {file}", f"precedence: {PRECEDENCE}", ""]
    lines += [f"{key.ljust(widths[0])}  {value.ljust(widths[1])}  {where}" for key, value, where in rows]
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    try:
        config = load(args, all_settings(load_plugins()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(config), indent=2) if args.json else render(config))
    return 0


def run_sample(_: argparse.Namespace) -> int:
    try:
        settings = all_settings(load_plugins())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_sample(settings), end="")
    return 0
