"""The verdict: does a model fit its budget, and if not, why and what would make it fit.

Fail closed: in ``enforce`` mode anything that stops the check from completing (unreadable model, unknown host
memory) is a ``MemoryCheckFailed`` and nothing starts. ``warn`` mode lets an operator who chooses it start the
model anyway, but invalid values (a bad quantity, a cache type llama.cpp refuses) are never allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from enum import StrEnum

from agent.estimate.budget import Budget, describe
from agent.estimate.estimator import Estimate, Estimator, advice, estimate, max_ctx_size
from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import load_shape
from agent.estimate.hostmem import HostMemory
from agent.estimate.shape import ModelShape, ServeSettings
from agent.util.quantity import format_bytes


class Reason(StrEnum):
    FITS = "Fits"
    INSUFFICIENT_MEMORY = "InsufficientMemory"
    MEMORY_CHECK_FAILED = "MemoryCheckFailed"
    INVALID_SPEC = "InvalidSpec"


class Mode(StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    allowed: bool  # may the model be started (False unless it fits, or warn mode lets it through)
    message: str
    settings: ServeSettings | None = None
    shape: ModelShape | None = None
    estimate: Estimate | None = None
    budget: Budget | None = None
    limit_bytes: int | None = None  # the binding constraint's bytes
    binding: str | None = None  # which constraint binds, in words
    max_ctx_size: int | None = None
    advice: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.reason is Reason.FITS

    @property
    def headroom_bytes(self) -> int | None:
        if self.estimate is None or self.limit_bytes is None:
            return None
        return self.limit_bytes - self.estimate.budgeted_bytes


WARN_SUFFIX = " (memory check mode is warn: starting anyway)"


def failed(
    reason: Reason,
    message: str,
    mode: Mode,
    settings: ServeSettings | None = None,
    shape: ModelShape | None = None,
    budget: Budget | None = None,
) -> Verdict:
    """A verdict for a check that could not complete; only ``warn`` mode lets a check failure through."""
    allowed = mode is Mode.WARN and reason is Reason.MEMORY_CHECK_FAILED
    message += WARN_SUFFIX if allowed else ""
    return Verdict(reason, allowed, message, settings=settings, shape=shape, budget=budget)


def judge(
    shape: ModelShape,
    settings: ServeSettings,
    budget: Budget,
    host: HostMemory,
    mode: Mode = Mode.ENFORCE,
    estimator: Estimator | None = None,
) -> Verdict:
    """Compare the estimate with the tightest constraint: the model's budget or what the host (or, for a GPU
    estimate, the GPU) can give. ``estimator`` replaces the default one (a GPU server's device estimate)."""
    estimator = estimator or estimate
    est = estimator(shape, settings)
    constraints = [(describe(budget), budget.bytes)]
    if host.total_bytes < budget.bytes:
        constraints.append((f"host memory {format_bytes(host.total_bytes)} ({host.source})", host.total_bytes))
    binding, limit = min(constraints, key=lambda c: c[1])
    total = est.budgeted_bytes
    fits = total <= limit
    verdict = Verdict(
        reason=Reason.FITS,
        allowed=True,
        message=(
            f"needs {format_bytes(total)} of {format_bytes(limit)} "
            f"({format_bytes(limit - total)} headroom; limit: {binding})"
        ),
        settings=settings,
        shape=shape,
        estimate=est,
        budget=budget,
        limit_bytes=limit,
        binding=binding,
        max_ctx_size=max_ctx_size(shape, settings, limit, estimator),
    )
    if fits:
        return verdict
    tips = tuple(advice(shape, settings, limit, estimator))
    largest = est.largest_component()
    message = (
        f"needs {format_bytes(total)} but the limit is {format_bytes(limit)} ({binding}); "
        f"largest part: {largest.replace('_', ' ')} {format_bytes(est.components()[largest])}"
    )
    message += ("; to fit: " + "; or ".join(tips)) if tips else ""
    allowed = mode is Mode.WARN
    message += WARN_SUFFIX if allowed else ""
    return dataclasses.replace(
        verdict, reason=Reason.INSUFFICIENT_MEMORY, allowed=allowed, message=message, advice=tips
    )


def preflight(
    model_path: str | os.PathLike[str],
    settings: ServeSettings,
    budget: Budget,
    host: HostMemory,
    mode: Mode = Mode.ENFORCE,
    estimator: Estimator | None = None,
) -> Verdict:
    """Read the model's header and judge it; never raises for a bad file or bad settings."""
    try:
        shape = load_shape(model_path)
    except (GGUFError, OSError) as exc:
        return failed(Reason.MEMORY_CHECK_FAILED, f"cannot read the model: {exc}", mode, settings=settings)
    try:
        return judge(shape, settings, budget, host, mode, estimator)
    except ValueError as exc:  # settings llama.cpp would refuse
        return failed(Reason.INVALID_SPEC, str(exc), mode, settings=settings, shape=shape, budget=budget)
