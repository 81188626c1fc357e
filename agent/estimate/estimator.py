"""Memory estimate of a model served by llama.cpp: weights + KV cache + compute + overhead.

Every term is what llama.cpp allocates, not a rule of thumb: weights are the exact tensor bytes, the KV cache
follows llama.cpp's cell arithmetic, and compute and overhead come from a model calibrated against real
llama.cpp (docs/calibration.md). The same functions answer "what would make it fit?".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from agent.estimate.compute_model import compute_buffer_bytes, runtime_overhead_bytes, uncalibrated_margin_bytes
from agent.estimate.kvcache import kv_cache_bytes, kv_cells, validate_settings
from agent.estimate.shape import ModelShape, ServeSettings
from agent.util.quantity import format_bytes

MIN_CTX = 256


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    kv_cells: int
    fallback: bool  # True when missing metadata or an uncalibrated architecture made us assume the worst
    notes: tuple[str, ...] = ()
    # GPU servers (agent/estimate/device_estimate.py): the total split into device memory (what nvidia-smi shows for the
    # process) and host memory; None on hosts where all memory is one kind.
    device_bytes: int | None = None
    host_bytes: int | None = None

    @property
    def budgeted_bytes(self) -> int:
        """What the unit's budget limits: device memory on a GPU, the total otherwise."""
        return self.total_bytes if self.device_bytes is None else self.device_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes

    def components(self) -> dict[str, int]:
        return {
            "weights": self.weights_bytes,
            "kv_cache": self.kv_cache_bytes,
            "compute": self.compute_bytes,
            "overhead": self.overhead_bytes,
        }

    def largest_component(self) -> str:
        parts = self.components()
        return max(parts, key=lambda name: parts[name])


def estimate(shape: ModelShape, settings: ServeSettings) -> Estimate:
    """Bytes llama.cpp will allocate to serve ``shape`` with ``settings``."""
    validate_settings(settings)
    notes: list[str] = []
    if shape.missing:
        notes.append(
            "metadata missing (" + ", ".join(shape.missing) + "): conservative assumptions used, "
            "the estimate may be high"
        )
    if shape.context_length and settings.ctx_size > shape.context_length:
        notes.append(f"context {settings.ctx_size} is beyond the model's training context {shape.context_length}")
    margin = uncalibrated_margin_bytes(shape, settings)
    if margin:
        notes.append(
            f"architecture {shape.architecture!r} has not been calibrated against llama.cpp: its compute buffer "
            f"is an upper bound (every phase of the graph added up, plus a share of the KV cache for caches it "
            f"may keep) that may be up to {format_bytes(margin)} over"
        )
    cells = kv_cells(shape, settings)
    return Estimate(
        weights_bytes=shape.weights_bytes,
        kv_cache_bytes=kv_cache_bytes(shape, settings),
        compute_bytes=compute_buffer_bytes(shape, settings),
        overhead_bytes=runtime_overhead_bytes(shape, settings),
        kv_cells=cells.total_full,
        fallback=shape.is_fallback or margin > 0,
        notes=tuple(notes),
    )


Estimator = Callable[[ModelShape, ServeSettings], Estimate]


def _fits(shape: ModelShape, settings: ServeSettings, limit: int, estimator: Estimator | None = None) -> bool:
    return (estimator or estimate)(shape, settings).budgeted_bytes <= limit


def max_ctx_size(shape: ModelShape, settings: ServeSettings, limit: int, estimator: Estimator | None = None) -> int:
    """The largest context (a multiple of 256, up to the training context) that fits ``limit``; 0 if none.

    The total grows monotonically with the context, so a binary search over 256-token steps is exact.
    """
    ceiling = shape.context_length or settings.ctx_size
    steps = max(ceiling // MIN_CTX, 1)

    def fits_at(step: int) -> bool:
        return _fits(shape, dataclasses.replace(settings, ctx_size=step * MIN_CTX), limit, estimator)

    if not fits_at(1):
        return 0
    low, high = 1, steps
    while low < high:
        mid = (low + high + 1) // 2
        if fits_at(mid):
            low = mid
        else:
            high = mid - 1
    return low * MIN_CTX


def advice(shape: ModelShape, settings: ServeSettings, limit: int, estimator: Estimator | None = None) -> list[str]:
    """Concrete changes that would make the model fit ``limit``, best first; empty when it already fits."""
    estimator = estimator or estimate
    current = estimator(shape, settings)
    if current.budgeted_bytes <= limit:
        return []
    tips: list[str] = []
    best_ctx = max_ctx_size(shape, settings, limit, estimator)
    if best_ctx:
        tips.append(f"reduce the context to {best_ctx} tokens (now {settings.ctx_size})")
    if not settings.flash_attn and _fits(shape, dataclasses.replace(settings, flash_attn=True), limit, estimator):
        tips.append("enable flash attention (the attention scores then never materialise in the compute buffer)")
    for k_type, v_type in (("q8_0", "q8_0"), ("q4_0", "q4_0")):
        if (settings.cache_type_k, settings.cache_type_v) == (k_type, v_type):
            continue
        quantized = dataclasses.replace(settings, cache_type_k=k_type, cache_type_v=v_type, flash_attn=True)
        try:
            if _fits(shape, quantized, limit, estimator):
                tips.append(f"quantize the KV cache: cacheTypeK/V {k_type} with flash attention")
                break
        except ValueError:  # head size not a multiple of the block size: that cache type is not possible
            continue
    if settings.parallel > 1:
        single = dataclasses.replace(settings, parallel=1)
        if _fits(shape, single, limit, estimator):
            tips.append(f"serve 1 parallel slot instead of {settings.parallel}")
    fixed = current.weights_bytes + current.overhead_bytes
    if fixed >= limit:
        tips.append(
            f"the weights and runtime alone need {format_bytes(fixed)}: use a smaller or more "
            f"quantized model, or raise the budget above {format_bytes(fixed)}"
        )
    else:
        tips.append(f"raise the budget by {format_bytes(current.budgeted_bytes - limit)}")
    return tips
