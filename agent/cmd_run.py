"""``metal-agent run``: the agent. Watches manifests, keeps every serving unit within budget, serves its API."""

from __future__ import annotations

import argparse
import functools
import ipaddress
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
from agent.kube import flags as kube_flags
from agent.kube.report import start_reporter
from agent.kube.source import ConfigError, KubeSource, load_configuration
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
            "Run the agent on a directory of Model and InferenceService manifests (standalone mode), or with "
            "--kube on the objects of a Kubernetes cluster: every serving unit is checked against its budget and "
            "the host budget before its server starts."
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
    kube_flags.add_arguments(p)
    kube = p.add_argument_group("Kubernetes mode: endpoints and identity")
    kube.add_argument("--agent-name", metavar="NAME", help="this agent in labels and Events (default: host name)")
    kube.add_argument("--advertise-address", metavar="IP", help="IP for EndpointSlices (default: route to the API)")
    kube.add_argument("--no-endpoints", action="store_true", help="register no Service/EndpointSlice per unit")
    kube.add_argument("--service-port", type=int, default=8080, metavar="N", help="port of each unit's Service")
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


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidValue(f"--advertise-address: {text!r} is not an IP address") from None


def port_number(value: int, field: str) -> int:
    if not 1 <= value <= 65535:
        raise InvalidValue(f"{field}: {value} is outside 1-65535")
    return value


def config_from(args: argparse.Namespace) -> AgentConfig:
    if not args.kube and (args.agent_name or args.advertise_address or args.no_endpoints or args.service_port != 8080):
        raise InvalidValue("--agent-name, --advertise-address, --no-endpoints and --service-port need --kube")
    return AgentConfig(
        ports=port_range(args.ports) if args.ports else None,
        state_dir=args.state_dir,
        memory_fraction=parse_fraction(args.memory_fraction, "--memory-fraction") if args.memory_fraction else None,
        mode=Mode(args.memory_check_mode),
        host_memory=parse_quantity(args.host_memory, "--host-memory") if args.host_memory else None,
        startup_timeout=args.startup_timeout,
        grace_period=args.grace_period,
        kube=kube_flags.settings_from(args),
        agent_name=args.agent_name,
        advertise_address=ip_address(args.advertise_address) if args.advertise_address else None,
        register_endpoints=not args.no_endpoints,
        service_port=port_number(args.service_port, "--service-port"),
    )


async def main_async(args: argparse.Namespace, config: AgentConfig, kube: KubeSource | None = None) -> None:
    agent = Agent(config, load_plugins())
    runner = await serve(agent, args.api_host, args.api_port)
    reporter = start_reporter(agent.plugins, kube.configuration, config) if kube else None  # status back to the API
    agent.report_status = reporter.stats if reporter else None
    log = structlog.get_logger("metal_agent")
    where = {"kubernetes": kube.configuration.host} if kube else {"manifests": str(args.manifests)}
    log.info("agent started", **where, api=f"http://{args.api_host}:{args.api_port}/status")
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
                    if kube is not None:
                        agent.source_status = kube.status
                        await kube.run(send, agent.set_source_errors)
                    else:
                        async for event in watch(args.manifests, args.poll_interval, agent.set_source_errors, synced):
                            await send.send(event)

            tasks.start_soon(source)
            tasks.start_soon(agent.run, receive)
            if reporter is not None:
                tasks.start_soon(reporter.run)
    finally:
        with anyio.CancelScope(shield=True):
            await agent.shutdown()
            if reporter is not None:
                await reporter.close()  # endpoints removed, statuses say the agent stopped
            await runner.cleanup()
            log.info("agent stopped")


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except InvalidValue as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kube = None
    if config.kube is not None:
        try:
            kube = KubeSource(config.kube, *anyio.run(load_configuration, config.kube))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif not args.manifests.is_dir():
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
        anyio.run(main_async, args, config, kube)
    finally:
        lock.release()
    return 0
