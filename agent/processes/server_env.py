"""The environment an inference server starts with: an allowlist, not the agent's whole environment.

The agent's environment holds what servers must never see: ``HF_TOKEN``, cloud credentials, a kubeconfig path,
``METAL_AGENT_*`` settings. A server gets only what running a program needs (``PATH``, ``HOME``, ``TMPDIR``,
locale and time zone, library paths), the accelerator's device selection (CUDA, ROCm, oneAPI, Metal, ggml), the
variables the operator adds with the ``server_env`` setting, and what the executor sets for this launch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ALLOWED = (
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TMP", "TEMP", "LANG", "LANGUAGE", "LC_*", "TZ",
    "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH",
    # accelerators: which devices, and how their runtimes find themselves
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_HOME", "CUDA_PATH", "CUDA_MPS_*", "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "HSA_OVERRIDE_GFX_VERSION", "ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR", "MTL_*", "METAL_DEVICE_WRAPPER_TYPE",
    "GGML_*", "OMP_NUM_THREADS",
)  # fmt: skip


def _allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def server_environment(
    environ: Mapping[str, str], executor_env: Mapping[str, str] | None = None, extra: Iterable[str] = ()
) -> dict[str, str]:
    """The allowed part of ``environ``, plus ``extra`` names (``NAME`` or ``PREFIX*``), plus the executor's own."""
    patterns = (*ALLOWED, *extra)
    env = {name: value for name, value in environ.items() if _allowed(name, patterns)}
    return {**env, **(executor_env or {})}
