"""MLX models (Apple Silicon): served by ``mlx_lm.server`` from a model directory.

MLX models are directories of safetensors with a Hugging Face ``config.json``. The estimate reads the layer
count, KV heads and head size from the config and the weights from the safetensors sizes, then reuses the
llama.cpp-calibrated terms. It has not been measured against MLX, so it is marked as lower confidence.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from agent.plugin import (
    Budget,
    Executor,
    HostMemory,
    Launch,
    Mode,
    ModelShape,
    Reason,
    ServingUnit,
    Setting,
    Verdict,
    failed,
    hookimpl,
    judge,
    read_bytes,
)
from plugins.extra_args import Allowlist, FlagTable, Use, allowlist_kind, flags, use_instead

MAX_CONFIG_JSON = 16 << 20
LOW_CONFIDENCE = "mlx: estimated from config.json and safetensors sizes, not measured against MLX (lower confidence)"


class MLXError(ValueError):
    """An MLX model directory that cannot be budgeted."""


def mlx_shape(directory: Path) -> ModelShape:
    try:
        config = json.loads(read_bytes(directory / "config.json", MAX_CONFIG_JSON))  # never a FIFO or a device
        layers = int(config["num_hidden_layers"])
        embd = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads", heads))
        head_dim = int(config.get("head_dim") or embd // heads)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise MLXError(f"{directory}: not an MLX model directory (config.json: {exc})") from exc
    weights = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    if not weights:
        raise MLXError(f"{directory}: no *.safetensors weights")
    return ModelShape(
        path=str(directory),
        architecture=str(config.get("model_type", "mlx")),
        n_layer=layers,
        n_embd=embd,
        n_head=heads,
        n_head_kv=(kv_heads,) * layers,
        key_length=(head_dim,) * layers,
        value_length=(head_dim,) * layers,
        n_vocab=int(config.get("vocab_size", 32000)),
        n_ff=int(config.get("intermediate_size", 4 * embd)),
        context_length=int(config.get("max_position_embeddings", 4096)),
        weights_bytes=weights,
        file_bytes=weights,
        tensor_count=0,
        missing=(LOW_CONFIDENCE,),
    )


def is_mlx(unit: ServingUnit) -> bool:
    return unit.model.format == "mlx" or unit.service.runtime == "mlx"


@hookimpl
def preflight(unit: ServingUnit, model_path: Path, budget: Budget, host: HostMemory, mode: str) -> Verdict | None:
    if not is_mlx(unit):
        return None
    try:
        shape = mlx_shape(model_path)
    except MLXError as exc:
        return failed(Reason.MEMORY_CHECK_FAILED, str(exc), Mode(mode), settings=unit.settings)
    return judge(shape, unit.settings, budget, host, Mode(mode))


# mlx_lm.server's flags (its argparse parser, which also takes any unique prefix of a flag: only exact tokens
# from the allowlist pass, so an abbreviation never reaches it).
MLX_SERVER = FlagTable(
    "mlx_lm.server",
    "[executors.mlx] extra_args_allowed",
    (
        *flags(Use.ALLOWED, "--temp N", "--top-p N", "--top-k N", "--min-p N", "--max-tokens N",
               "--chat-template TEMPLATE", "--use-default-chat-template", "--chat-template-args JSON",
               "--log-level LEVEL"),
        *flags(Use.MEMORY, "--decode-concurrency N", "--prompt-concurrency N", "--prefill-step-size N",
               "--prompt-cache-size N", "--prompt-cache-bytes N", "--max-kv-size N", "--kv-bits N",
               "--kv-group-size N", "--quantized-kv-start N", "--pipeline", "--max-active-kv-bytes N",
               "--max-active-memory-bytes N", "--cache-limit-gb N", "--num-draft-tokens N"),
        *flags(Use.NETWORK, "--host HOST", instead="the agent sets it (servers.host in its config)"),
        *flags(Use.NETWORK, "--port PORT", instead="the agent sets it (servers.ports in its config)"),
        *flags(Use.NETWORK, "--allowed-origins LIST"),
        *flags(Use.FILES, "--model PATH", instead=use_instead("Model spec.source")),
        *flags(Use.FILES, "--adapter-path PATH", "--draft-model MODEL"),
        *flags(Use.FILES, "--trust-remote-code", instead="it runs Python code that comes with the model"),
        *flags(Use.OTHER, "-h --help", "--max-prompt-tokens N", "--prompt-overflow-policy POLICY",
               "--prompt-keep-tokens N"),
    ),
)  # fmt: skip
DEFAULT_ALLOWLIST = MLX_SERVER.allowlist()


class MLXExecutor:
    name = "mlx"

    def __init__(self, host: str = "127.0.0.1", allowlist: Allowlist = DEFAULT_ALLOWLIST) -> None:
        self.host = host  # where the server listens; the agent probes it on 127.0.0.1
        self.allowlist = allowlist

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if is_mlx(unit) else "not an MLX model (format mlx or runtime mlx)"

    def check_spec(self, unit: ServingUnit) -> str | None:
        return self.allowlist.problem(unit.service.extra_args)

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        found = shutil.which("mlx_lm.server")
        if found:
            prefix = [found]
        elif find_spec("mlx_lm") is not None:
            prefix = [sys.executable, "-m", "mlx_lm.server"]
        else:
            raise RuntimeError("mlx_lm.server was not found: `pip install mlx-lm` (Apple Silicon only)")
        extra = self.allowlist.check(unit.service.extra_args)  # checked before admission too; raises if refused
        argv = [*prefix, "--model", str(model_path), "--host", self.host, "--port", str(port)]
        return Launch(argv=argv + extra, health_path="/v1/models")


SETTINGS = (
    Setting("mlx_extra_args_allowed", "executors.mlx", "extra_args_allowed", allowlist_kind(MLX_SERVER), None,
            "mlx_lm.server flags extraArgs may use besides the default allowlist (sampling and chat options); "
            "never ones that change memory, the network or files", example=["--max-prompt-tokens"]),
)  # fmt: skip


@hookimpl
def agent_settings() -> list[Setting]:
    return list(SETTINGS)


@hookimpl
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    allowlist = MLX_SERVER.allowlist(settings.get("mlx_extra_args_allowed") or ())
    register(MLXExecutor(host=settings.get("server_host") or "127.0.0.1", allowlist=allowlist))
