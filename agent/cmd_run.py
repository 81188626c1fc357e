"""``metal-agent run``: the agent. Watches manifests, keeps every serving unit within budget, serves its API."""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import structlog

from agent.api import serve
from agent.instance_lock import AlreadyRunning, InstanceLock
from agent.pipeline import Agent, AgentConfig
from agent.plugin_manager import load_plugins
from agent.preflight import Mode
from agent.quantity import InvalidValue, parse_fraction, parse_quantity
from agent.standalone import SYNCED, Event, Synced, watch
from plugins.llamacpp import BINARY_ENV, MLOCK_ENV

DEFAULT_STATE_DIR = Path("~/.local/state/metal-agent").expanduser()
DEFAULT_API_PORT = 9464


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the agent",
        description=(
            "Run the agent on a directory of Model and InferenceService manifests (standalone mode): every "
            "serving unit is checked against its budget and the host budget before its server starts."
        ),
    )
    p.add_argument("--manifests", type=Path, default=Path("config/samples"), help="manifest directory")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="logs and state")
    p.add_argument("--api-host", default="127.0.0.1")
    p.add_argument(
        "--api-port", type=int, default=DEFAULT_API_PORT, help=f"local API port (default {DEFAULT_API_PORT})"
    )
    p.add_argument("--memory-fraction", metavar="F", help="share of host memory for all models, 0 < F <= 1")
    p.add_argument("--memory-check-mode", choices=[m.value for m in Mode], default=Mode.ENFORCE.value)
    p.add_argument("--host-memory", metavar="Q", help="pretend the host has this much memory, e.g. 64Gi")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /health")
    p.add_argument("--grace-period", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument(
        "--llama-server", metavar="PATH", help="the llama-server binary (default: PATH, Homebrew, xllamacpp)"
    )
    p.add_argument(
        "--mlock", action="store_true", help="pass --mlock to llama-server: weights wired in RAM (macOS: wired memory)"
    )
    p.add_argument("--ports", metavar="FIRST-LAST", help="serve on ports from this range (default: kernel-assigned)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between manifest directory scans")
    p.add_argument(
        "--pressure-warning", metavar="F", help="available share of memory at which admissions wait (default 0.20)"
    )
    p.add_argument(
        "--pressure-critical", metavar="F", help="available share of memory at which units are evicted (default 0.10)"
    )
    p.add_argument(
        "--pressure-hysteresis", metavar="F", help="margin above a threshold before its level clears (default 0.05)"
    )
    p.add_argument("--pressure-interval", type=float, default=2.0, help="seconds between memory samples (default 2)")
    p.add_argument(
        "--no-eviction", action="store_true", help="under critical memory pressure only block admissions, evict nothing"
    )
    p.set_defaults(handler=run)


def port_range(text: str) -> range:
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise InvalidValue(f"--ports: {text!r} is not a port range like 8100-8199") from None
    if not 1 <= low <= high <= 65535:
        raise InvalidValue(f"--ports: {text!r} is outside 1-65535 or reversed")
    return range(low, high + 1)


def config_from(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        ports=port_range(args.ports) if args.ports else None,
        state_dir=args.state_dir,
        memory_fraction=parse_fraction(args.memory_fraction, "--memory-fraction") if args.memory_fraction else None,
        mode=Mode(args.memory_check_mode),
        host_memory=parse_quantity(args.host_memory, "--host-memory") if args.host_memory else None,
        startup_timeout=args.startup_timeout,
        grace_period=args.grace_period,
        **pressure_settings(args),
    )


def pressure_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The memory-pressure flags given, as AgentConfig fields (validated there, with the flag's name on error)."""
    settings: dict[str, Any] = {"pressure_interval": args.pressure_interval, "eviction": not args.no_eviction}
    for name in ("warning", "critical", "hysteresis"):
        text = getattr(args, f"pressure_{name}")
        if text is not None:
            flag = f"--pressure-{name}"
            try:
                value = float(text)
            except ValueError:
                raise InvalidValue(f"{flag}: {text!r} is not a number") from None
            settings[f"pressure_{name}"] = value if name == "hysteresis" else parse_fraction(text, flag)
    return settings


async def main_async(args: argparse.Namespace, config: AgentConfig) -> None:
    agent = Agent(config, load_plugins())
    runner = await serve(agent, args.api_host, args.api_port)
    log = structlog.get_logger("metal_agent")
    log.info("agent started", manifests=str(args.manifests), api=f"http://{args.api_host}:{args.api_port}/status")
    try:
        async with anyio.create_task_group() as tasks:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        tasks.cancel_scope.cancel()
                        return

            tasks.start_soon(stop_on_signal)
            # The source runs apart from the pipeline; the first listing ends with SYNCED, so that what it
            # did not contain (children of deleted units) is reaped only after every event in it is applied.
            send, receive = anyio.create_memory_object_stream[Event | Synced](math.inf)

            async def source() -> None:
                synced = functools.partial(send.send_nowait, SYNCED)
                async with send:
                    async for event in watch(args.manifests, args.poll_interval, agent.set_source_errors, synced):
                        await send.send(event)

            tasks.start_soon(source)
            tasks.start_soon(agent.run, receive)
    finally:
        with anyio.CancelScope(shield=True):
            await agent.shutdown()
            await runner.cleanup()
            log.info("agent stopped")


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except InvalidValue as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.manifests.is_dir():
        print(f"error: --manifests {args.manifests} is not a directory", file=sys.stderr)
        return 2
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(config.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.llama_server:
        os.environ[BINARY_ENV] = args.llama_server
    if args.mlock:
        os.environ[MLOCK_ENV] = "1"
    try:
        anyio.run(main_async, args, config)
    finally:
        lock.release()
    return 0
