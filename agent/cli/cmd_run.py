"""``metal-agent run``: the agent. Watches manifests, keeps every serving unit within budget, serves its API."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import structlog

from agent.cli.setting_flags import flag_settings
from agent.config.loading import (
    PRECEDENCE,
    Config,
    ConfigError,
    add_config_flag,
    add_setting_flags,
    all_settings,
    load,
)
from agent.config.settings import port_range as port_range  # re-exported: the --ports parser
from agent.engine.pipeline import Agent, AgentConfig
from agent.engine.plugin_manager import Plugins, load_plugins
from agent.kube import flags as kube_flags
from agent.kube.report import start_reporter
from agent.kube.source import ConfigError as KubeConfigError
from agent.kube.source import KubeSource, load_configuration
from agent.models.model_store import default_model_store
from agent.processes.instance_lock import AlreadyRunning, InstanceLock
from agent.service.api import serve
from agent.sources.standalone import SYNCED, Event, Synced, watch
from agent.util import logs
from agent.util.quantity import InvalidValue
from agent.util.safe_files import private_dir, write_atomic

HELP = f"""\
Sizes are Kubernetes quantities: binary Ki Mi Gi Ti (64Gi), decimal k M G T (64G), plain bytes or 1e9.
Settings: {PRECEDENCE}.
Every flag above has a METAL_AGENT_* variable and a key in the TOML file, both shown in its help;
`metal-agent config show` prints each value and where it came from.
A Model's budget: spec.hardware.memoryBudget > memoryFraction > --memory-fraction of the host > adaptive
(0.67 of RAM up to 36 GiB, 0.75 above); all servers together stay within the host budget.

exit status:
  0  stopped by SIGTERM or SIGINT (every server it started is stopped too)
  1  the agent failed while running (e.g. the API port is taken)
  2  invalid flags or configuration, no manifest directory, a state directory that cannot be used (not
     writable, state file not a regular file), or another agent holds the state directory
"""


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "run",
        help=help_line,
        description=(
            "Run the agent on a directory of Model and InferenceService manifests (standalone mode), or with "
            "--kube on the objects of a Kubernetes cluster: every serving unit is checked against its budget and "
            "the host budget before its server starts."
        ),
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flag(p)
    add_setting_flags(p, flag_settings())
    p.set_defaults(handler=run)


class AgentFailed(RuntimeError):
    """The agent cannot go on (exit status 1); the message says why."""


def config_from(config: Config) -> AgentConfig:
    return AgentConfig(**config.fields(f.name for f in dataclasses.fields(AgentConfig)))


async def main_async(
    args: argparse.Namespace, config: AgentConfig, plugins: Plugins, kube: KubeSource | None = None
) -> None:
    agent = Agent(config, plugins)
    try:
        runner = await serve(agent, args.api_host, args.api_port)
    except OSError as exc:
        raise AgentFailed(f"cannot serve the local API on {args.api_host}:{args.api_port}: {exc.strerror}") from None
    runners = [runner]
    where: dict[str, str | None] = {}
    if kube and config.register_endpoints:  # on-demand units' Services point here
        proxy_host = args.server_host  # the servers' address: 0.0.0.0 unless --server-host (effective_config)
        where["cluster_v1"] = f"{proxy_host}:{config.proxy_port}"
        try:
            runners.append(await serve(agent, proxy_host, config.proxy_port, cluster=True))
        except OSError as exc:
            await runner.cleanup()
            raise AgentFailed(
                f"cannot serve the cluster-facing /v1 endpoint on {proxy_host}:{config.proxy_port} (--proxy-port): "
                f"{exc.strerror}"
            ) from None
    # The status back to the API server; its permanent refusals counted in /metrics.
    reporter = start_reporter(agent.plugins, kube.configuration, config, agent.metrics.kube_refused) if kube else None
    agent.report_status = reporter.stats if reporter else None
    log = structlog.get_logger("metal_agent")
    where |= {"kubernetes": kube.configuration.host} if kube else {"manifests": str(args.manifests)}
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
                        for state in kube.states.values():
                            state.on_reconnect = agent.metrics.watch_reconnected
                        await kube.run(send, agent.set_source_errors)
                    else:
                        events = watch(
                            args.manifests, args.poll_interval, agent.set_source_errors, synced, args.manifest_max_size
                        )
                        async for event in events:
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
            for each in runners:
                await each.cleanup()
            log.info("agent stopped")


def effective_config(args: argparse.Namespace, plugins: Plugins) -> tuple[Config, AgentConfig]:
    """Every setting from its sources (args.NAME becomes its effective value) and the agent's configuration.
    Raises ConfigError or InvalidValue, each one line naming the file, variable or flag."""
    settings = load(args, all_settings(plugins))
    vars(args).update(settings.values())
    kube_settings = kube_flags.settings_from(args)
    if kube_settings and args.endpoints and not args.server_host:
        args.server_host = "0.0.0.0"  # the EndpointSlice sends the cluster to this host's address
    plugins.settings = {**settings.values(), "server_host": args.server_host}
    # Local models may lie in the store, the --model-root directories and (standalone) the manifest directory.
    roots = (*(() if kube_settings else (args.manifests,)), *(args.model_root or ()))
    config = dataclasses.replace(
        config_from(settings),
        kube=kube_settings,
        model_store=args.model_store or default_model_store(),
        model_roots=roots,
    )
    return settings, config


def state_dir_problem(state_dir: Path) -> str | None:
    """Why the state directory cannot serve (one line), or None; it is made private (0700) on the way.

    Checked once at start, so that a read-only or foreign directory is an ``error:`` line and exit 2, not a
    traceback; while running, a failed save only degrades the state (agent/processes/state_keeper.py).
    """
    try:
        private_dir(state_dir)
    except OSError as exc:
        return f"cannot create {state_dir}: {exc.strerror or exc}"
    try:
        private_dir(state_dir / "logs")
        probe = state_dir / f".write-test-{os.getpid()}"
        write_atomic(probe, b"")
        probe.unlink()
    except OSError as exc:
        return f"{state_dir} is not a writable directory: {exc.strerror or exc}"
    state_file = state_dir / "children.json"
    if os.path.lexists(state_file) and not state_file.is_file():
        return f"{state_file} is not a regular file; remove it (the agent writes it)"
    return None


def run(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    try:
        settings, config = effective_config(args, plugins)
    except (ConfigError, InvalidValue) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format)  # the file may set them too; flags and env still win
    kube = None
    if config.kube is not None:
        try:
            kube = KubeSource(config.kube, *anyio.run(load_configuration, config.kube))
        except KubeConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif not args.manifests.is_dir():
        print(f"error: {settings.where('manifests')}: {args.manifests} is not a directory", file=sys.stderr)
        return 2
    for root in args.model_root or ():
        if not root.is_dir():
            print(f"error: {settings.where('model_root')}: {root} is not a directory", file=sys.stderr)
            return 2
    problem = state_dir_problem(config.state_dir)
    if problem:
        print(f"error: {settings.where('state_dir')}: {problem}", file=sys.stderr)
        return 2
    lock = InstanceLock(config.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {settings.where('state_dir')}: cannot lock {lock.path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(main_async, args, config, plugins, kube)
    except AgentFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    return 0
