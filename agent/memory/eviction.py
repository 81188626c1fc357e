"""Which running units to stop when memory must be given back, and in what order.

Used under critical memory pressure and when the host budget shrinks. Order: units without
``evictionProtection`` first (a protected unit goes only once every unprotected one is gone), then the lowest
priority (batch before critical), then the largest footprint (fewest servers stopped for the memory needed),
then the latest arrival. Only as many as needed to free ``need_bytes`` are chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    key: str
    rank: int  # 0 is the highest priority (critical)
    protected: bool
    footprint: int  # bytes it holds now (measured after load, the estimate before)
    seq: int  # arrival order


def eviction_order(candidates: Iterable[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (c.protected, -c.rank, -c.footprint, -c.seq))


def choose_victims(candidates: Iterable[Candidate], need_bytes: int) -> list[Candidate]:
    """Units in eviction order until their footprints add up to ``need_bytes`` (all of them if that is not enough)."""
    victims: list[Candidate] = []
    freed = 0
    for candidate in eviction_order(candidates):
        if freed >= need_bytes:
            break
        victims.append(candidate)
        freed += candidate.footprint
    return victims
