"""llama.cpp's own HTTP server, run from the ``xllamacpp`` wheel, with ``llama-server``'s flag names.

Where no ``llama-server`` binary exists (a fresh Linux box, CI), ``python -m plugins.xllamacpp_server ...``
stands in for it: same flags, same endpoints (/health, /v1/chat/completions, /metrics), same log lines. It
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

FLASH_ATTN = {"on": 1, "off": 0, "auto": -1}
REASONING_FORMATS = {
    "none": "COMMON_REASONING_FORMAT_NONE",
    "auto": "COMMON_REASONING_FORMAT_AUTO",
    "deepseek": "COMMON_REASONING_FORMAT_DEEPSEEK",
    "deepseek-legacy": "COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY",
}
DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "random seed" (-1 as an unsigned 32-bit value)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: llama-server takes no abbreviations, so neither does its stand-in (`--ctx` is an error)
    p = argparse.ArgumentParser(prog="xllamacpp-server", description=__doc__, allow_abbrev=False)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-ctk", "--cache-type-k", default="f16")
    p.add_argument("-ctv", "--cache-type-v", default="f16")
    p.add_argument("-fa", "--flash-attn", choices=sorted(FLASH_ATTN), default="off")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    p.add_argument("--cache-ram", type=int, default=0, help="MiB of host prompt cache")
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--swa-full", action="store_true")
    p.add_argument("--metrics", action="store_true")
    p.add_argument("--mlock", action="store_true", help="accepted for compatibility; the wheel does not expose it")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("-t", "--threads", type=int, default=0)
    p.add_argument("-v", "-lv", "--verbosity", "--log-verbosity", type=int, default=4)
    # The options of extraArgs' default allowlist that a stand-in is most often given, spelled as llama-server does.
    p.add_argument("-a", "--alias")
    p.add_argument("--temp", "--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("-s", "--seed", type=int)
    p.add_argument("-n", "--predict", "--n-predict", dest="n_predict", type=int)
    p.add_argument("--jinja", action=argparse.BooleanOptionalAction)
    p.add_argument("--chat-template")
    p.add_argument("--reasoning-format", choices=sorted(REASONING_FORMATS))
    p.add_argument("-to", "--timeout", type=int)
    p.add_argument("--threads-http", type=int)
    p.add_argument("--slots", action=argparse.BooleanOptionalAction)
    return p


def _sampling_and_chat(params: Any, args: argparse.Namespace) -> None:
    import xllamacpp

    sampling = params.sampling
    for name, value in (("temp", args.temp), ("top_k", args.top_k), ("top_p", args.top_p), ("min_p", args.min_p)):
        if value is not None:
            setattr(sampling, name, value)
    if args.seed is not None:
        sampling.seed = args.seed if args.seed >= 0 else DEFAULT_SEED
    if args.alias is not None:
        params.model_alias = {args.alias}
    if args.reasoning_format is not None:
        params.reasoning_format = getattr(xllamacpp.common_reasoning_format, REASONING_FORMATS[args.reasoning_format])
    optional = (("n_predict", args.n_predict), ("use_jinja", args.jinja), ("chat_template", args.chat_template),
                ("n_threads_http", args.threads_http), ("endpoint_slots", args.slots))  # fmt: skip
    for name, value in optional:
        if value is not None:
            setattr(params, name, value)
    if args.timeout is not None:
        params.timeout_read = params.timeout_write = args.timeout


def params_from(args: argparse.Namespace) -> Any:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.n_batch = args.batch_size
    params.n_ubatch = args.ubatch_size
    params.cache_type_k = xllamacpp.ggml_type[f"GGML_TYPE_{args.cache_type_k.upper()}"]
    params.cache_type_v = xllamacpp.ggml_type[f"GGML_TYPE_{args.cache_type_v.upper()}"]
    params.flash_attn_type = xllamacpp.llama_flash_attn_type(FLASH_ATTN[args.flash_attn])
    params.n_gpu_layers = args.n_gpu_layers
    params.cache_ram_mib = args.cache_ram
    params.kv_unified = args.kv_unified
    params.swa_full = args.swa_full
    params.endpoint_metrics = args.metrics
    params.warmup = not args.no_warmup
    params.verbosity = args.verbosity
    if args.threads > 0:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    _sampling_and_chat(params, args)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import xllamacpp
    except ImportError:
        print(
            "error: the xllamacpp wheel is not installed: pip install 'metal-agent[xllamacpp]'",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = xllamacpp.Server(params_from(args))
    print(f"main: server is listening on {server.listening_address}", file=sys.stderr, flush=True)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
