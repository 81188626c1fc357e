"""``contextSize: auto``: the largest context a unit can have now, chosen at admission.

llama.cpp splits ``--ctx-size`` evenly between its ``--parallel`` slots, so the total is chosen as a whole number
of slots times a per-slot context that is a multiple of 256 and at most the model's training context. The limit
is the tightest of the unit's own budget, the host memory and what the admission ledger can give it now; the
search is the estimator's (``max_ctx_size``, the same one behind the "to fit" hints of ``metal-agent estimate``).

Never below ``minContextSize`` (default 4096): when even that does not fit what the ledger can give, the minimum is
asked for and the unit waits in the queue (Pending) as any other; when it does not fit the unit's own budget, the
pre-flight check fails with its advice. The choice is made at each start and kept while the server runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from agent.estimate.estimator import MIN_CTX, max_ctx_size
from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import load_shape
from agent.estimate.shape import ModelShape, ServeSettings
from agent.sources.manifest import DEFAULT_CTX_SIZE, MAX_CTX_SIZE
from agent.sources.units import ServingUnit


@dataclass(frozen=True)
class SizedUnit(ServingUnit):
    """A unit with its context chosen. To the pipeline it is the same unit: its spec hash is the spec's own, so the
    choice is never taken for a spec change (which would stop the server it starts)."""

    spec_key: str = ""

    def spec_hash(self) -> str:
        return self.spec_key


def largest_context(shape: ModelShape, settings: ServeSettings, limit: int) -> int:
    """The largest total context (``parallel`` slots of a multiple of 256 tokens, each at most the training
    context) whose estimate fits ``limit``; 0 when not even 256 tokens a slot fit."""
    slots = max(settings.parallel, 1)
    per_slot_ceiling = shape.context_length or settings.ctx_size
    ceiling = min(per_slot_ceiling * slots, MAX_CTX_SIZE)
    # The estimator's search stops at the shape's training context: here the ceiling is that times the slots.
    total = max_ctx_size(dataclasses.replace(shape, context_length=ceiling), settings, limit)
    step = MIN_CTX * slots
    return total // step * step


def choose(unit: ServingUnit, shape: ModelShape, limit: int) -> int:
    """The context for ``unit`` under ``limit`` bytes: the largest that fits, never below its minimum."""
    minimum = unit.service.min_context_size or DEFAULT_CTX_SIZE
    return max(largest_context(shape, unit.settings, limit), minimum)


def sized(unit: ServingUnit, model_path: str | os.PathLike[str], limit: int) -> tuple[ServingUnit, int | None]:
    """``unit`` with its context chosen (and the choice), or unchanged with None when it does not ask for auto. When
    its header cannot be read, the minimum is asked for (the pre-flight check then says why) and None returned."""
    if not unit.service.context_auto:
        return unit, None
    chosen: int | None
    try:
        chosen = choose(unit, load_shape(model_path), limit)
        ctx = chosen
    except (GGUFError, OSError, ValueError):
        chosen, ctx = None, unit.service.min_context_size or DEFAULT_CTX_SIZE
    service = dataclasses.replace(unit.service, context_size=ctx)
    return SizedUnit(service=service, model=unit.model, spec_key=unit.spec_hash()), chosen
