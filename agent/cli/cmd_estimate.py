"""``metal-agent estimate``: would this model fit, and why.

Exit status: 0 fits, 1 does not fit, 2 invalid input or unreadable model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from agent.config.kube_settings import default_accelerators
from agent.config.loading import ConfigError, add_config_flag, all_settings, load
from agent.engine.plugin_manager import Plugins, load_plugins
from agent.estimate.budget import Budget
from agent.estimate.gguf_header import GGUFError
from agent.estimate.hostmem import HostMemory, detect_host_memory
from agent.estimate.kvcache import InvalidSettings, validate_settings
from agent.estimate.preflight import Mode, Reason, Verdict
from agent.estimate.shape import KV_CACHE_TYPES, ServeSettings
from agent.memory import gpus
from agent.models.model_store import SourceError, default_model_store, remote_url
from agent.sources.manifest import ManifestError, ModelSpec, ServiceSpec, load_file
from agent.sources.units import ServingUnit
from agent.util.quantity import InvalidValue, format_bytes, parse_fraction, parse_quantity

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID = 0, 1, 2
ACCELERATORS = ("metal", "cpu", "cuda")
AGENT_FRACTION_ENV = "METAL_AGENT_MEMORY_FRACTION"


class UsageError(Exception):
    """Invalid input: printed as one ``error:`` line, exit status 2."""


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "estimate",
        help=help_line,
        description=(
            "Estimate what llama.cpp will allocate for MODEL (a GGUF file, the first shard of a split model, or a "
            "Model manifest in YAML whose hardware fields apply) and check it against the budget. Budget "
            "precedence: --memory-budget > --memory-fraction > the Model's memoryBudget > memoryFraction > "
            f"the agent's memory.fraction (${AGENT_FRACTION_ENV} or the config file) > adaptive default (0.67 of "
            "RAM up to 36 GiB, 0.75 above). The agent's memory.host_memory applies unless --host-memory is given. "
            "Quantities use Kubernetes units: 24Gi, 512Mi, 32G, 1e9."
        ),
        epilog="exit status:\n  0  fits\n  1  does not fit (InsufficientMemory)\n"
        "  2  invalid input or a model that cannot be read (MemoryCheckFailed): one `error:` line on stderr\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="GGUF file, https:// or hf:// URL, or Model manifest (YAML)")
    p.add_argument("--ctx-size", "-c", type=int, help="context size in tokens (default: the manifest's, else 4096)")
    p.add_argument("--parallel", "-np", type=int, help="parallel slots (default 1)")
    p.add_argument("--cache-type-k", "-ctk", choices=KV_CACHE_TYPES, help="KV cache type for K (default f16)")
    p.add_argument("--cache-type-v", "-ctv", choices=KV_CACHE_TYPES, help="KV cache type for V (default f16)")
    p.add_argument("--flash-attn", "-fa", action="store_true", default=None, help="flash attention on")
    p.add_argument("--ubatch-size", "-ub", type=int, help="physical batch size (default 512)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--memory-budget", metavar="Q", help="the Model's memoryBudget, e.g. 24Gi")
    group.add_argument("--memory-fraction", metavar="F", help="the Model's memoryFraction, 0 < F <= 1")
    p.add_argument("--host-memory", metavar="Q", help="pretend the host has this much memory, e.g. 64Gi")
    p.add_argument(
        "--accelerator",
        choices=ACCELERATORS,
        help="what the model runs on (default: the manifest's, else this host's: metal on macOS, cuda where an "
        "NVIDIA GPU is found, else cpu); cuda budgets GPU memory and splits the estimate into device and host",
    )
    p.add_argument("--gpu-memory", metavar="Q", help="cuda: pretend each GPU has this much memory, e.g. 24Gi")
    p.add_argument("--gpu-count", type=int, metavar="N", help="cuda: GPUs the model is split over (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flag(p)
    p.set_defaults(handler=run)


def _load_target(source: str) -> tuple[Path, ModelSpec | None, ServiceSpec | None]:
    """The GGUF path and, for a manifest, its Model and the first InferenceService that uses it.

    A remote model (a URL, or a manifest naming one) is sized from its header, fetched by HTTP Range.
    """
    if remote_url(source) is not None:
        return _plan_remote(source), None, None
    path = Path(source)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return path, None, None
    objects = load_file(path)
    models = [o for o in objects if isinstance(o, ModelSpec)]
    if not models:
        raise UsageError(f"{path}: no Model in this manifest")
    model = models[0]
    service = next((o for o in objects if isinstance(o, ServiceSpec) and o.model_ref == model.name), None)
    local = model.local_path()
    if local is None:
        return _plan_remote(model.source), model, service
    return local, model, service


def _plan_remote(source: str) -> Path:
    """Where a remote model will be, its header fetched; the HTTP client is imported only for remote models."""
    from agent.engine.model_fetch import plan_remote
    from agent.models.download import DownloadError

    try:
        return plan_remote(source, default_model_store())
    except DownloadError as exc:
        raise UsageError(str(exc)) from None


def _settings(args: argparse.Namespace, service: ServiceSpec | None) -> ServeSettings:
    base = service.settings() if service else ServeSettings()
    overrides = {
        "ctx_size": args.ctx_size,
        "parallel": args.parallel,
        "cache_type_k": args.cache_type_k,
        "cache_type_v": args.cache_type_v,
        "flash_attn": args.flash_attn,
        "n_ubatch": args.ubatch_size,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _model(args: argparse.Namespace, target: Path, model: ModelSpec | None) -> ModelSpec:
    """The Model the agent would see: the manifest's (or one for a bare file), with this command's overrides."""
    spec = model or ModelSpec(name="estimate", namespace="default", source=str(target), accelerator=_host_accelerator())
    if args.memory_budget is not None or args.memory_fraction is not None:
        fraction = None if args.memory_fraction is None else parse_fraction(args.memory_fraction, "--memory-fraction")
        if args.memory_budget is not None:
            parse_quantity(args.memory_budget, "--memory-budget")
        spec = dataclasses.replace(spec, memory_budget=args.memory_budget, memory_fraction=fraction)
    if args.accelerator is not None:
        spec = dataclasses.replace(spec, accelerator=args.accelerator)
    if args.gpu_count is not None:
        if args.gpu_count < 1:
            raise UsageError(f"--gpu-count: {args.gpu_count} is not a number of GPUs (1 or more)")
        spec = dataclasses.replace(spec, gpu_count=args.gpu_count)
    return spec


def _host_accelerator() -> str:
    """What this host serves by default: metal on macOS, cuda where an NVIDIA GPU answers, else cpu."""
    return default_accelerators()[0]


def _service(settings: ServeSettings, service: ServiceSpec | None, model: ModelSpec) -> ServiceSpec:
    base = service or ServiceSpec(name=model.name, namespace=model.namespace, model_ref=model.name)
    return dataclasses.replace(
        base,
        context_size=settings.ctx_size,
        parallel_slots=settings.parallel,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        flash_attention=settings.flash_attn,
        batch_size=settings.n_batch,
        ubatch_size=settings.n_ubatch,
    )


def evaluate(args: argparse.Namespace) -> tuple[Verdict, Path, HostMemory]:
    """The agent's own decision: the same ``resolve_budget`` and ``preflight`` hooks (plugins included)."""
    target, model, service = _load_target(args.model)
    settings = _settings(args, service)
    try:
        validate_settings(settings)  # before they become a spec, whose zeros mean "the default"
    except InvalidSettings as exc:
        raise UsageError(str(exc)) from None
    plugins = load_plugins()
    # The agent's own settings (config file, METAL_AGENT_*): its fraction and host memory apply here too. Only
    # --config is passed on: this command's --memory-fraction is the Model's, not the agent's.
    agent = load(argparse.Namespace(config=args.config), all_settings(plugins))
    override = parse_quantity(args.host_memory, "--host-memory") if args.host_memory else agent["host_memory"]
    host = detect_host_memory(override)
    spec = _model(args, target, model)
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--gpu-count", args.gpu_count)):
        if value is not None and spec.accelerator != "cuda":
            raise UsageError(f"{flag} applies to --accelerator cuda (the model's accelerator is {spec.accelerator})")
    if args.gpu_memory is not None:
        each = parse_quantity(args.gpu_memory, "--gpu-memory")
        gpus.PRETEND = [gpus.GPU(i, each, 0) for i in range(max(1, spec.gpu_count or 1))]
    plugins.settings = agent.values()
    plugins.executors()  # plugins take their settings (the CUDA context overhead)
    unit = ServingUnit(service=_service(settings, service, spec), model=spec)
    try:
        return anyio.run(_decide, plugins, unit, target, host, agent["memory_fraction"]), target, host
    finally:
        gpus.PRETEND = None


async def _decide(
    plugins: Plugins, unit: ServingUnit, target: Path, host: HostMemory, agent_fraction: float | None
) -> Verdict:
    budget: Budget = await plugins.first("resolve_budget", unit=unit, host=host, agent_fraction=agent_fraction)
    verdict: Verdict = await plugins.first(
        "preflight", unit=unit, model_path=target, budget=budget, host=host, mode=str(Mode.ENFORCE)
    )
    return verdict


def run(args: argparse.Namespace) -> int:
    try:
        verdict, target, host = evaluate(args)
    except (UsageError, ManifestError, InvalidValue, GGUFError, ConfigError, SourceError) as exc:
        return _error(str(exc))
    except RuntimeError as exc:  # host memory could not be detected: fail closed
        return _error(f"cannot check memory: {exc}")
    if verdict.estimate is None or verdict.reason in (Reason.MEMORY_CHECK_FAILED, Reason.INVALID_SPEC):
        return _error(verdict.message)
    if args.json:
        print(json.dumps(to_json(verdict, target, host)))
    else:
        print(render(verdict, target, host))
    return EXIT_FITS if verdict.fits else EXIT_DOES_NOT_FIT


def _error(message: str) -> int:
    print(f"error: {message}".replace("\n", " "), file=sys.stderr)
    return EXIT_INVALID


def to_json(verdict: Verdict, target: Path, host: HostMemory) -> dict[str, Any]:
    shape, est, budget, settings = verdict.shape, verdict.estimate, verdict.budget, verdict.settings
    assert shape and est and budget and settings
    return {
        "model": {
            "path": str(target),
            "architecture": shape.architecture,
            "block_count": shape.n_layer,
            "context_length": shape.context_length,
            "file_bytes": shape.file_bytes,
            "shards": shape.shard_count,
            "missing_metadata": list(shape.missing),
        },
        "settings": {
            "ctx_size": settings.ctx_size,
            "parallel": settings.parallel,
            "cache_type_k": settings.cache_type_k,
            "cache_type_v": settings.cache_type_v,
            "flash_attn": settings.flash_attn,
            "n_ubatch": settings.n_ubatch,
        },
        "estimate": {
            "weights_bytes": est.weights_bytes,
            "kv_cache_bytes": est.kv_cache_bytes,
            "compute_bytes": est.compute_bytes,
            "overhead_bytes": est.overhead_bytes,
            "total_bytes": est.total_bytes,
            **(
                {"device_bytes": est.device_bytes, "host_bytes": est.host_bytes} if est.device_bytes is not None else {}
            ),
            "kv_cells": est.kv_cells,
            "fallback": est.fallback,
            "notes": list(est.notes),
        },
        "budget": {
            "bytes": budget.bytes,
            "source": budget.source,
            "fraction": budget.fraction,
            "host_total_bytes": budget.host_total_bytes,
        },
        "host": {"total_bytes": host.total_bytes, "source": host.source, "notes": list(host.notes)},
        "fits": verdict.fits,
        "reason": str(verdict.reason),
        "message": verdict.message,
        "limit_bytes": verdict.limit_bytes,
        "binding": verdict.binding,
        "headroom_bytes": verdict.headroom_bytes,
        "max_ctx_size": verdict.max_ctx_size,
        "advice": list(verdict.advice),
    }


def render(verdict: Verdict, target: Path, host: HostMemory) -> str:
    shape, est, budget, settings = verdict.shape, verdict.estimate, verdict.budget, verdict.settings
    assert shape and est and budget and settings and verdict.limit_bytes is not None
    kv_note = f"{est.kv_cells} cells, K {settings.cache_type_k} / V {settings.cache_type_v}"
    rows = [
        ("weights", est.weights_bytes, f"{shape.tensor_count} tensors in {shape.shard_count} file(s)"),
        ("KV cache", est.kv_cache_bytes, kv_note),
        (
            "compute",
            est.compute_bytes,
            f"ubatch {settings.n_ubatch}, flash attention {_on(settings.flash_attn)}",
        ),
        ("overhead", est.overhead_bytes, "output buffer, runtime"),
        ("total", est.total_bytes, ""),
        *(
            [("GPU", est.device_bytes, "what nvidia-smi will show for the server"), ("host", est.host_bytes or 0, "")]
            if est.device_bytes is not None
            else []
        ),
        ("limit", verdict.limit_bytes, verdict.binding or ""),
    ]
    lines = [
        f"model     {target}",
        f"          {shape.architecture}, {shape.n_layer} layers, training context {shape.context_length}",
        f"settings  ctx {settings.ctx_size}, parallel {settings.parallel}",
        f"host      {format_bytes(host.total_bytes)} ({host.source})",
        *(f"          note: {note}" for note in host.notes),
        "",
    ]
    lines += [f"{name:<9} {format_bytes(size):>12}  {note}".rstrip() for name, size, note in rows]
    lines += ["", *(f"note: {n}" for n in est.notes)]
    verdict_word = "FITS" if verdict.fits else str(verdict.reason)
    lines.append(f"{verdict_word}: {verdict.message}")
    if verdict.max_ctx_size is not None:
        lines.append(f"largest context that fits: {verdict.max_ctx_size or 'none'}")
    return "\n".join(line for line in lines if line is not None)


def _on(flag: bool) -> str:
    return "on" if flag else "off"
