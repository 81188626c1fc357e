"""``metal-agent plugins``: loaded plugins, their executors and versions, and plugins that failed to load."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.engine.plugin_manager import load_plugins

EPILOG = """\
Plugins load from the metal_agent.executors entry point group (METAL_AGENT_DISABLE_PLUGIN_AUTOLOAD=1: only the
built-in ones); third-party executors come before the built-in ones. A plugin's settings live in its own TOML
table ([executors.NAME]) and METAL_AGENT_* variables. A plugin that cannot be imported, has an unknown hook,
declares a setting that is taken or raises while loading is left out, and listed with the reason.

exit status:
  0  listed (plugins that failed to load are listed too, with the reason)
"""


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "plugins",
        help=help_line,
        description="List the loaded plugins with their versions, the executors in the order they are asked, the "
        "settings plugins declare, and plugins that failed to load.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def describe() -> dict[str, Any]:
    plugins = load_plugins()
    executors = plugins.executors()
    listed = [
        {"name": name, "version": plugins.versions.get(name, "unknown")}
        for name, _ in plugins.manager.list_name_plugin()
    ]
    settings = [
        {"plugin": plugin, "key": s.dotted, "env": s.env, "flag": s.flag_name if s.flag else None}
        for plugin, s in plugins.declared_settings()
    ]
    return {
        "plugins": listed,
        "executors": [{"name": e.name, "plugin": type(e).__module__} for e in executors],
        "settings": settings,
        "failed": plugins.failures,
    }


def run(args: argparse.Namespace) -> int:
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("plugins:")
    for plugin in info["plugins"]:
        print(f"  {plugin['name']}  {plugin['version']}")
    print("executors (first that accepts a model wins):")
    for executor in info["executors"]:
        print(f"  {executor['name']}  ({executor['plugin']})")
    tables: dict[tuple[str, str], list[str]] = {}
    for setting in info["settings"]:
        section, _, key = setting["key"].rpartition(".")
        tables.setdefault((section, setting["plugin"]), []).append(key)
    if tables:
        print("plugin settings (TOML table, keys):")
    for (section, plugin), keys in tables.items():
        print(f"  [{section}] {', '.join(keys)}  ({plugin})")
    for name, error in info["failed"].items():
        print(f"failed to load {name}: {error}")
    return 0
