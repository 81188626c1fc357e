"""The llama-server command line: explicit memory settings, safe extra args, binary discovery."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from agent.estimate.shape import ServeSettings
from plugins.extra_args import ExtraArgsRefused
from plugins.llamacpp import (
    ServerNotFound,
    ServerOptions,
    find_llama_server,
    server_argv,
)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_memory_setting_is_explicit() -> None:
    settings = ServeSettings(ctx_size=8192, parallel=2, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True)
    argv = server_argv(["llama-server"], "/m.gguf", settings, 41234, ServerOptions(extra_args=("--threads", "4")))
    assert argv[0] == "llama-server"
    assert flag(argv, "--ctx-size") == "8192" and flag(argv, "--parallel") == "2"
    assert flag(argv, "--cache-type-k") == "q8_0" and flag(argv, "--flash-attn") == "on"
    assert flag(argv, "--cache-ram") == "0"  # llama-server's default 8 GiB prompt cache is not left on
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "41234"
    assert flag(argv, "--n-gpu-layers") == "99" and "--metrics" in argv and "--mlock" not in argv
    assert argv[-2:] == ["--threads", "4"]


@pytest.mark.parametrize("extra", [("-c", "0"), ("--ctx-size=131072",), ("--parallel", "8"), ("--cache-ram", "8192")])
def test_extra_args_cannot_change_memory_behind_the_budget(extra: tuple[str, ...]) -> None:
    with pytest.raises(ExtraArgsRefused, match="extraArgs"):  # checked again when the command is built
        server_argv(["llama-server"], "/m.gguf", ServeSettings(), 1, ServerOptions(extra_args=extra))


def test_gpu_layers_and_mlock() -> None:
    argv = server_argv(["x"], "/m", ServeSettings(), 1, ServerOptions(gpu_layers=12, mlock=True))
    assert flag(argv, "--n-gpu-layers") == "12" and "--mlock" in argv


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_discovery_order(tmp_path: Path) -> None:
    configured = executable(tmp_path / "custom-server")
    assert find_llama_server(str(configured)) == [str(configured)]
    with pytest.raises(ServerNotFound, match="not an executable"):
        find_llama_server(str(tmp_path / "missing"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    on_path = executable(bin_dir / "llama-server")
    assert find_llama_server(search_path=str(bin_dir)) == [str(on_path)]


def test_fallback_to_the_xllamacpp_stand_in(tmp_path: Path) -> None:
    if any(os.access(Path(d) / "llama-server", os.X_OK) for d in ("/opt/homebrew/bin", "/usr/local/bin")):
        pytest.skip("a llama-server is installed in a well-known directory")
    assert find_llama_server(search_path=str(tmp_path)) == [sys.executable, "-m", "plugins.xllamacpp_server"]


def test_ports_kernel_assigned_or_from_a_configured_range() -> None:
    import socket

    from agent.cli.cmd_run import port_range
    from agent.processes.ports import free_port
    from agent.util.quantity import InvalidValue

    def bindable(port: int) -> bool:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    assert free_port() > 0
    for _ in range(50):  # other processes on the machine use ports too: find a busy port with a free one 2 above
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken_port = busy.getsockname()[1]
            if not bindable(taken_port + 2):
                continue
            chosen = free_port(range(taken_port, taken_port + 3), taken=frozenset({taken_port + 1}))
            assert chosen == taken_port + 2  # skips the busy port and the one another unit holds
            break
    else:
        pytest.fail("no busy port with a free one two above it")
    assert port_range("8100-8199") == range(8100, 8200) and port_range("9000") == range(9000, 9001)
    for bad in ("x-1", "9000-8000", "0-10", "70000"):
        with pytest.raises(InvalidValue, match="--ports"):
            port_range(bad)


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        ([], "127.0.0.1"),  # standalone: nothing but this machine reaches the servers
        (["--server-host", "192.0.2.7"], "192.0.2.7"),
        (["--kube"], "0.0.0.0"),  # the EndpointSlice sends the cluster to this host's address
        (["--kube", "--no-endpoints"], "127.0.0.1"),
        (["--kube", "--server-host", "127.0.0.1"], "127.0.0.1"),
    ],
)
def test_servers_listen_where_the_mode_needs_them(argv: list[str], host: str, tmp_path: Path) -> None:
    from agent.cli import build_parser
    from agent.cli.cmd_run import effective_config
    from agent.engine.plugin_manager import load_plugins
    from agent.sources.manifest import ModelSpec, ServiceSpec
    from agent.sources.units import ServingUnit

    kubeconfig = ["--kubeconfig", str(tmp_path / "kubeconfig")] if "--kube" in argv else []
    plugins = load_plugins(entry_points=False)
    effective_config(build_parser().parse_args(["run", *argv, *kubeconfig]), plugins)
    unit = ServingUnit(ServiceSpec("chat", "default", "m"), ModelSpec("m", "default", "/m.gguf", accelerator="cpu"))
    executors = {executor.name: executor for executor in plugins.executors()}
    assert flag(executors["llamacpp"].command(unit, Path("/m.gguf"), 8080).argv, "--host") == host
    assert executors["mlx"].host == host  # type: ignore[attr-defined]  # (no mlx_lm here to build its command)


def test_the_server_prints_its_buffers_at_verbosity_4_and_the_stand_in_takes_the_flag() -> None:
    """llama-server prints its buffer sizes only at -lv 4: without it, measuring by the log measures nothing."""
    from plugins.xllamacpp_server import build_parser

    argv = server_argv(["llama-server"], "/m.gguf", ServeSettings(), 41234, ServerOptions())
    assert flag(argv, "-lv") == "4"
    parsed = build_parser().parse_args(argv[1:])
    assert parsed.verbosity == 4 and parsed.port == 41234
