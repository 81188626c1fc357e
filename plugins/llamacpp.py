"""llama.cpp's ``llama-server``: finding it and the command line that serves a model within its estimate.

Every setting that changes memory is passed explicitly, because llama-server's defaults are what the budget
cannot see: ``-c 0`` means the training context (often 128k), ``-np`` auto means 4 slots, and ``--cache-ram``
defaults to an 8 GiB host prompt cache. The command is an argument list, never a shell string, and a unit's
extraArgs reach it only through the allowlist (``plugins.extra_args``), checked again here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.plugin import (
    BOOLEAN,
    PATH,
    Executor,
    Footprint,
    InvalidValue,
    Launch,
    ServeSettings,
    ServingUnit,
    Setting,
    hookimpl,
    measure_process,
    quoted,
)
from plugins.extra_args import Allowlist, allowlist_kind
from plugins.llama_flags import LLAMA_SERVER

BINARY = "llama-server"
WELL_KNOWN_DIRS = ("/opt/homebrew/bin", "/usr/local/bin")
DEFAULT_ALLOWLIST = LLAMA_SERVER.allowlist()
INSTALL_HINT = (
    "llama-server was not found: install llama.cpp (macOS: `brew install llama.cpp`), set its path in the "
    "config, or install the fallback with `pip install 'metal-agent[xllamacpp]'`"
)


# llama-server prints its buffer sizes (what the agent measures a server by) only at verbosity 4 and above.
LOG_VERBOSITY = 4


class ServerNotFound(RuntimeError):
    """No llama-server binary and no xllamacpp fallback; the message says how to install one."""


def find_llama_server(configured: str | None = None, search_path: str | None = None) -> list[str]:
    """The command prefix that runs llama-server: config, PATH, well-known dirs, then the xllamacpp stand-in."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return [str(path)]
        raise ServerNotFound(f"the configured llama-server {configured!r} is not an executable file")
    found = shutil.which(BINARY, path=search_path)
    if found:
        return [found]
    for directory in WELL_KNOWN_DIRS:
        candidate = Path(directory) / BINARY
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        raise ServerNotFound(INSTALL_HINT) from None
    return [sys.executable, "-m", "plugins.xllamacpp_server"]


@dataclass(frozen=True)
class ServerOptions:
    """What the agent decides beyond the memory settings."""

    host: str = "127.0.0.1"
    gpu_layers: int | None = None  # LLMKube: 0 or None means all layers (99)
    mlock: bool = False
    threads: int | None = None
    extra_args: tuple[str, ...] = ()
    allowlist: Allowlist = DEFAULT_ALLOWLIST  # which extraArgs may reach the server


def server_argv(
    command: Sequence[str], model: str | os.PathLike[str], settings: ServeSettings, port: int, options: ServerOptions
) -> list[str]:
    extra = options.allowlist.check(options.extra_args)  # raises ExtraArgsRefused
    gpu_layers = 99 if not options.gpu_layers or options.gpu_layers < 0 else options.gpu_layers
    argv = [
        *command,
        "--model", str(model),
        "--host", options.host,
        "--port", str(port),
        "--ctx-size", str(settings.ctx_size),
        "--parallel", str(settings.parallel),
        "--batch-size", str(settings.n_batch),
        "--ubatch-size", str(settings.n_ubatch),
        "--cache-type-k", settings.cache_type_k,
        "--cache-type-v", settings.cache_type_v,
        "--flash-attn", "on" if settings.flash_attn else "off",
        "--cache-ram", str(settings.cache_ram_bytes >> 20),
        "--n-gpu-layers", str(gpu_layers),
        "--metrics",
        "-lv", str(LOG_VERBOSITY),
    ]  # fmt: skip
    if settings.kv_unified:
        argv.append("--kv-unified")
    if settings.swa_full:
        argv.append("--swa-full")
    if options.mlock:
        argv.append("--mlock")
    if options.threads:
        argv += ["--threads", str(options.threads)]
    return argv + extra


class LlamaCppExecutor:
    """GGUF models on llama.cpp: Metal on macOS, CPU elsewhere (and the xllamacpp stand-in where no binary)."""

    name = "llamacpp"
    accelerators: tuple[str, ...] = ("metal", "cpu")

    def __init__(self, binary: str | None = None, options: ServerOptions | None = None) -> None:
        self.binary, self.options = binary, options or ServerOptions()

    def accepts(self, unit: ServingUnit) -> str | None:
        if unit.service.runtime not in ("llamacpp", "llama.cpp"):
            return f"runtime {quoted(unit.service.runtime)} is not llamacpp"
        if unit.model.format != "gguf":
            return f"format {unit.model.format!r} is not gguf"
        if unit.model.accelerator not in self.accelerators:
            return f"accelerator {unit.model.accelerator!r} is not one of {', '.join(self.accelerators)}"
        return None

    def check_spec(self, unit: ServingUnit) -> str | None:
        return self.options.allowlist.problem(unit.service.extra_args)

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        options = dataclasses.replace(
            self.options, gpu_layers=unit.model.gpu_layers, extra_args=unit.service.extra_args
        )
        argv = server_argv(find_llama_server(self.binary), model_path, unit.settings, port, options)
        return Launch(argv=argv, cwd=Path(__file__).resolve().parent.parent)

    def measure(self, pid: int, log_path: Path | None = None) -> Footprint:
        """Host memory (RSS on Linux, the physical footprint on macOS) and llama.cpp's buffer report."""
        return measure_process(pid, log_path)


def _executable(value: str, where: str) -> Path:
    path: Path = PATH.convert(value, where)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InvalidValue(f"{where}: {path} is not an executable file")
    return path


# A configured binary that is not there fails at start, not later when a model is served.
EXECUTABLE = dataclasses.replace(PATH, name="path of an executable file", convert=_executable)
SETTINGS = (
    Setting("llama_server", "executors.llamacpp", "binary", EXECUTABLE, None,
            "the llama-server binary (default: PATH, then /opt/homebrew/bin and /usr/local/bin, then xllamacpp)",
            example="/opt/homebrew/bin/llama-server"),
    Setting("mlock", "executors.llamacpp", "mlock", BOOLEAN, False,
            "pass --mlock to llama-server: weights wired in RAM (macOS: wired memory)"),
    Setting("llamacpp_extra_args_allowed", "executors.llamacpp", "extra_args_allowed", allowlist_kind(LLAMA_SERVER),
            None, "llama-server flags extraArgs may use besides the default allowlist (sampling, chat, threads, "
            "timeouts); never ones that change memory, the network or files", example=["--no-webui", "--props"]),
)  # fmt: skip


@hookimpl
def agent_settings() -> list[Setting]:
    return list(SETTINGS)


def executor_arguments(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``LlamaCppExecutor`` arguments from the effective configuration (shared with the CUDA executor)."""
    binary = settings.get("llama_server")
    options = ServerOptions(
        host=settings.get("server_host") or "127.0.0.1",
        mlock=bool(settings.get("mlock")),
        allowlist=LLAMA_SERVER.allowlist(settings.get("llamacpp_extra_args_allowed") or ()),
    )
    return {"binary": str(binary) if binary else None, "options": options}


@hookimpl
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    register(LlamaCppExecutor(**executor_arguments(settings)))
