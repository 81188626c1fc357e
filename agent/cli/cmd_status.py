"""``metal-agent status``: the running agent's units and memory, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from agent.config.loading import Config, ConfigError, add_config_flag, all_settings, load
from agent.engine.plugin_manager import load_plugins
from agent.util.duration import format_duration
from agent.util.quantity import format_bytes

EPILOG = """\
The agent's address comes from --api, else from the configuration (api.host and api.port: the config file,
METAL_AGENT_API_HOST / METAL_AGENT_API_PORT), else http://127.0.0.1:9464.
Sizes are binary (GiB = 2^30 bytes). BUDGET is the unit's budget and where it came from: model-budget
(memoryBudget), model-fraction (memoryFraction), agent (--memory-fraction) or adaptive.

exit status:
  0  printed
  1  --endpoint: the unit has no endpoint (not Ready, or unknown)
  2  the agent cannot be reached, or invalid flags or configuration
"""
COLUMNS = ("MODEL", "PHASE", "REASON", "BUDGET (SOURCE)", "ESTIMATE", "ACTUAL", "PID", "PORT", "ENDPOINT", "RESTARTS")


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "status",
        help=help_line,
        description="Show the running agent's host memory, budget and every serving unit, as a table or JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flag(p)
    p.add_argument("--api", metavar="URL", help="the agent's local API (default: from the configuration)")
    p.add_argument("--json", action="store_true", help="print the status JSON")
    p.add_argument("--endpoint", metavar="UNIT", help="print only this unit's endpoint URL (namespace/name)")
    p.set_defaults(handler=run)


def api_url(config: Config) -> str:
    """The URL that reaches an agent listening on ``api.host``: a wildcard address is reached on loopback."""
    host = str(config["api_host"])
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config['api_port']}"


def _size(value: int | None) -> str:
    return format_bytes(value) if value else "-"


def row(unit: dict[str, Any]) -> tuple[str, ...]:
    budget = unit["budget"]
    return (
        unit["unit"],
        unit["phase"],
        unit["reason"] or "-",
        f"{_size(budget['bytes'])} ({budget['source']})" if budget else "-",
        _size((unit["estimate"] or {}).get("total")),
        _size((unit.get("measured") or {}).get("total_bytes") or (unit["actual"] or {}).get("rss")),
        str(unit["pid"] or "-"),
        str(unit.get("port") or "-"),
        unit["endpoint"] or "-",
        str(unit["restarts"]),
    )


def on_demand_line(unit: dict[str, Any], now: float) -> str:
    """``default/a: on demand, Ready (context 8192); last request 12s ago; stops in 9m48s unused``."""
    demand = unit["on_demand"]
    context = f" (context {unit['context_size']})" if unit.get("context_size") else ""
    last = demand["last_request"]
    text = f"{unit['unit']}: on demand, {demand['state']}{context}; last request "
    text += f"{format_duration(max(0.0, now - last))} ago" if last else "never"
    if demand["in_flight"]:
        text += f"; serving {demand['in_flight']} request(s)"
    elif demand["stops_in_s"] is not None:
        text += f"; stops in {format_duration(demand['stops_in_s'])} unused"
    else:
        text += f"; idle timeout {format_duration(demand['idle_timeout_s'])}"
    return text


def render(status: dict[str, Any]) -> str:
    host = status["host"]
    budget, reserved = host["budget_bytes"], host["reserved_bytes"]
    lines = [
        f"host: {format_bytes(host['total_bytes'])} total, {format_bytes(host['available_bytes'])} available; "
        f"budget {format_bytes(budget)} ({host['budget_source']}), reserved {format_bytes(reserved)} "
        f"({reserved / budget:.0%})",
        *(gpu_line(index, gpu) for index, gpu in (status.get("admission") or {}).get("gpus", {}).items()),
        "",
    ]
    rows = [COLUMNS, *(row(unit) for unit in status["units"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not status["units"]:
        lines.append("(no serving units: add Model and InferenceService manifests)")
    lines += [on_demand_line(unit, time.time()) for unit in status["units"] if unit.get("on_demand")]
    for unit in status["units"]:
        if unit["phase"] != "Ready" and unit["message"]:
            lines.append(f"{unit['unit']}: {unit['message']}")
    for path, message in status.get("manifest_errors", {}).items():
        lines.append(f"invalid manifest {path}: {message}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        api = args.api or api_url(load(args, all_settings(load_plugins())))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(api.rstrip("/") + "/status", timeout=5) as response:
            status = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot reach the agent at {api}: {exc}", file=sys.stderr)
        return 2
    if args.endpoint:
        unit = next((u for u in status["units"] if u["unit"] == args.endpoint), None)
        if unit is None or not unit["endpoint"]:
            print(
                f"error: {args.endpoint} has no endpoint (phase {unit['phase'] if unit else 'unknown'})",
                file=sys.stderr,
            )
            return 1
        print(unit["endpoint"])
        return 0
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def gpu_line(index: str, gpu: dict[str, Any]) -> str:
    line = f"GPU {index}: budget {format_bytes(gpu['budget_bytes'])}, reserved {format_bytes(gpu['reserved_bytes'])}"
    free = gpu.get("device_free_bytes")  # absent from an older agent's status
    return line if free is None else f"{line}; {format_bytes(free)} free on the device"
