"""``metal-agent status``: the running agent's units and memory, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from agent.cmd_run import DEFAULT_API_PORT
from agent.quantity import format_bytes


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="show the running agent's units and memory")
    p.add_argument("--api", default=f"http://127.0.0.1:{DEFAULT_API_PORT}", help="the agent's local API")
    p.add_argument("--json", action="store_true", help="print the status JSON")
    p.add_argument("--endpoint", metavar="UNIT", help="print only this unit's endpoint URL (namespace/name)")
    p.set_defaults(handler=run)


def _size(value: int | None) -> str:
    return format_bytes(value) if value else "-"


def render(status: dict[str, Any]) -> str:
    host = status["host"]
    budget, reserved = host["budget_bytes"], host["reserved_bytes"]
    lines = [
        f"host: {format_bytes(host['total_bytes'])} total, {format_bytes(host['available_bytes'])} available; "
        f"budget {format_bytes(budget)} ({host['budget_source']}), reserved {format_bytes(reserved)} "
        f"({reserved / budget:.0%})",
        "",
    ]
    header = ("UNIT", "PHASE", "REASON", "BUDGET", "ESTIMATE", "ACTUAL", "PID", "ENDPOINT", "RESTARTS")
    rows = [header]
    for unit in status["units"]:
        budget_text = f"{_size(unit['budget']['bytes'])} ({unit['budget']['source']})" if unit["budget"] else "-"
        rows.append(
            (
                unit["unit"],
                unit["phase"],
                unit["reason"],
                budget_text,
                _size((unit["estimate"] or {}).get("total")),
                _size((unit["actual"] or {}).get("rss")),
                str(unit["pid"] or "-"),
                unit["endpoint"] or "-",
                str(unit["restarts"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    for unit in status["units"]:
        if unit["phase"] != "Ready" and unit["message"]:
            lines.append(f"{unit['unit']}: {unit['message']}")
    for path, message in status.get("manifest_errors", {}).items():
        lines.append(f"invalid manifest {path}: {message}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.api.rstrip("/") + "/status", timeout=5) as response:
            status = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot reach the agent at {args.api}: {exc}", file=sys.stderr)
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
