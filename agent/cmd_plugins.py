"""``metal-agent plugins``: loaded plugins, their executors and versions, and plugins that failed to load."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.plugin_manager import load_plugins


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("plugins", help="list loaded plugins and executors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def describe() -> dict[str, Any]:
    plugins = load_plugins()
    executors = plugins.executors()
    listed = [
        {"name": name, "version": plugins.versions.get(name, "unknown")}
        for name, _ in plugins.manager.list_name_plugin()
    ]
    return {
        "plugins": listed,
        "executors": [{"name": e.name, "plugin": type(e).__module__} for e in executors],
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
    for name, error in info["failed"].items():
        print(f"failed to load {name}: {error}")
    return 0
