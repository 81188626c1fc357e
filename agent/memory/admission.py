"""Admission: which units may hold memory now, and the queue of those waiting for it.

Every starting or running server holds a reservation in the ``Ledger``; a unit is admitted only if the sum of
reservations plus its estimate stays within the host budget *and* the OS has the memory available now (less
what units that are still loading have been promised but not yet touched), so a foreign process eating RAM is
noticed. Once the server has loaded the measured footprint replaces the estimate where the measurement is
authoritative (else the ledger holds the larger of the two).

Units that do not fit wait in a queue ordered by priority (critical > high > normal > low > batch), then
arrival. Rule for a small unit behind a big one: **backfill within a priority level, never past a higher
one**. When memory frees, waiters are considered in order; a waiter that does not fit stops every waiter of a
lower priority from starting (they would take memory the higher-priority unit is waiting for), while a later
waiter of the same priority may start if it fits. Servers run until deleted, so strict order would let one big
model hold every small one of its level back indefinitely; backfill never delays a higher-priority unit.

A unit whose estimate exceeds the whole host budget can never fit and is refused rather than queued.

GPU servers also hold device memory: one ledger per GPU, each with its budget. A unit on ``gpu_count`` GPUs
asks each for an equal share of its device estimate (llama.cpp's default layer split) and is admitted onto the
GPUs with the most room, never past what the device has free now (``observe_gpus``: other tenants of a card
count); one whose share exceeds every GPU can never fit either. While
memory pressure is at warning or above, nothing is admitted (waiters say ``MemoryPressure``).

Methods never await: on the event loop each call is atomic, so concurrent arrivals cannot over-commit. The queue
is weighed afresh only when something it depends on changed (the ledger, the OS's figure, pressure, who waits);
otherwise a new arrival is weighed alone against the same state, so a burst of arrivals costs no re-sorting.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from agent.memory import gpu_ledgers
from agent.memory.eviction import Candidate, choose_victims
from agent.memory.footprint import Footprint
from agent.memory.ledger import Ledger
from agent.sources.manifest import PRIORITIES
from agent.util.quantity import format_bytes

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
INSUFFICIENT_MEMORY = "InsufficientMemory"
MEMORY_PRESSURE = "MemoryPressure"
EVICTED = "Evicted"


class Outcome(StrEnum):
    ADMITTED = "Admitted"
    WAITING = "Waiting"
    NEVER_FITS = "NeverFits"


@dataclass
class Claim:
    """One unit's request for memory: queued while it waits, held once admitted."""

    key: str
    need: int  # bytes asked for (the estimate); the ledger holds the measured footprint after load
    rank: int
    protected: bool
    seq: int
    reason: str = INSUFFICIENT_MEMORY
    message: str = ""
    device_need: int = 0  # GPU bytes asked for, split evenly over ``gpu_count`` GPUs
    gpu_count: int = 1
    gpus: tuple[int, ...] = ()  # the GPUs it holds device memory on, once admitted

    @property
    def share(self) -> int:
        """What it asks of each of its GPUs."""
        return gpu_ledgers.share(self.device_need, self.gpu_count)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    message: str


class Admission:
    def __init__(self, capacity: int) -> None:
        self.ledger = Ledger(capacity)
        self.gpu_ledgers: dict[int, Ledger] = {}  # GPU index -> its device-memory ledger (none: no GPU known)
        self.waiting: dict[str, Claim] = {}
        self.holders: dict[str, Claim] = {}
        self.loading: set[str] = set()  # admitted, not yet measured: the OS does not see their memory yet
        self.device_free: dict[int, int] | None = None  # GPU index -> free bytes at the last look (None: not read)
        self.evicting: set[str] = set()  # chosen for eviction, still holding until their server is gone
        self.new_grants: set[str] = set()  # admitted from the queue; their worker has not come back yet
        self.blocked: str | None = None  # why nothing is admitted now (memory pressure), or None
        self.counts: Counter[str] = Counter()  # admitted, queued, rejected, evicted: exported as metrics
        self._seq = itertools.count()
        self._ranks: Counter[int] = Counter()  # waiting claims per priority rank
        self._settled: tuple[int, tuple[int, ...]] | None = (
            None  # (available, ledger versions) the queue was last weighed at
        )

    # -- requests -------------------------------------------------------------------------------------------
    def request(
        self,
        key: str,
        need: int,
        priority: str,
        protected: bool,
        available: int,
        device_need: int = 0,
        gpu_count: int = 1,
    ) -> Decision:
        """Admit ``key`` now (reserving ``need`` of host memory and ``device_need`` over ``gpu_count`` GPUs), queue
        it, or refuse it for good; ``available``: the OS's figure."""
        never = self._never_fits(need, device_need, gpu_count)
        if never:
            self.forget(key)
            self.grant(available)  # what it held (a grant whose estimate grew past the budget) may let waiters in
            self.counts["rejected"] += 1
            return Decision(Outcome.NEVER_FITS, INSUFFICIENT_MEMORY, never)
        rank = PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"])
        held = self.holders.get(key)
        if held is not None:  # admitted from the queue: check again just before launch
            held.need, held.rank, held.protected = need, rank, protected
            held.device_need, held.gpu_count = device_need, gpu_count
            self.new_grants.discard(key)
            if not self.blocked and self._fits(held, available):
                self.ledger.reserve(key, need)
                self._reserve_gpus(held)
                self.grant(available)  # a smaller estimate than when it was admitted may let others in
                return Decision(Outcome.ADMITTED, "Admitted", "")
            self._unhold(key)
            self._enqueue(held)  # back in the queue at its place
        else:
            claim = self.waiting.get(key)
            if claim is None:
                self._enqueue(Claim(key, need, rank, protected, next(self._seq)))
                self.counts["queued"] += 1
            elif claim.rank != rank:
                self._dequeue(key)
                claim.rank = rank
                self._enqueue(claim)
                self._settled = None  # it may now hold others back, or no longer
            self.waiting[key].need, self.waiting[key].protected = need, protected
            self.waiting[key].device_need, self.waiting[key].gpu_count = device_need, gpu_count
        claim = self.waiting[key]
        if self.blocked is None and self._settled == (available, self.version):
            self._admit_alone(claim, available)  # the other waiters were weighed against this very state
        else:
            self.grant(available)
        if key in self.holders:
            self.new_grants.discard(key)
            return Decision(Outcome.ADMITTED, "Admitted", "")
        self._explain(claim, available)
        return Decision(Outcome.WAITING, claim.reason, claim.message)

    def grant(self, available: int) -> list[str]:
        """Admit waiters in order while they fit (see the module's rule); returns the keys admitted."""
        if self.blocked is not None or self._settled == (available, self.version):
            return []  # nothing changed since the queue was last weighed
        headroom = self._os_headroom(available)
        stop_rank: int | None = None
        admitted: list[str] = []
        for claim in sorted(self.waiting.values(), key=lambda c: (c.rank, c.seq)):
            if stop_rank is not None and claim.rank > stop_rank:
                break  # a higher-priority unit waits for memory: nothing of lower priority may take it
            if self._never_fits(claim.need, claim.device_need, claim.gpu_count):
                continue  # refused when its worker asks again
            if (
                claim.need <= self.ledger.free_for(claim.key)
                and claim.need <= headroom
                and self._gpus_for(claim) is not None
            ):
                self._admit(claim)
                headroom -= claim.need
                admitted.append(claim.key)
            elif stop_rank is None:
                stop_rank = claim.rank
        self._settled = (available, self.version)
        return admitted

    def hold(self, key: str, need: int, priority: str, protected: bool) -> None:
        """Account for a server that already runs (adopted after an agent restart), whatever the budget says."""
        self._dequeue(key)
        rank = PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"])
        self.holders[key] = Claim(key, need, rank, protected, next(self._seq), "Adopted")
        self.ledger.set(key, need)
        self.loading.add(key)  # settled with its measured footprint once healthy

    def _admit_alone(self, claim: Claim, available: int) -> None:
        """Only ``claim`` is new to the queue: it starts if no higher-priority unit waits and it fits."""
        if (
            self._first_rank_ahead(claim) is None
            and claim.need <= self.ledger.free_for(claim.key)
            and claim.need <= self._os_headroom(available)
            and self._gpus_for(claim) is not None
        ):
            self._admit(claim)
        self._settled = (available, self.version)

    def _admit(self, claim: Claim) -> None:
        self._dequeue(claim.key)
        self.ledger.reserve(claim.key, claim.need)
        self._reserve_gpus(claim)
        self.holders[claim.key] = claim
        self.loading.add(claim.key)
        self.new_grants.add(claim.key)
        self.counts["admitted"] += 1

    def _explain(self, claim: Claim, available: int) -> None:
        """Why ``claim`` waits, in its reason and message (for its status)."""
        if self.blocked is not None:
            if claim.reason != EVICTED:
                claim.reason, claim.message = MEMORY_PRESSURE, f"{self.blocked}; it starts when pressure eases"
            return
        claim.reason = INSUFFICIENT_MEMORY
        ahead = self._first_rank_ahead(claim)
        if ahead is not None:
            claim.message = f"waits behind {PRIORITIES[ahead]}-priority units that need memory first"
        else:
            headroom = self._os_headroom(available, claim.key)
            claim.message = self._why_not(claim, self.ledger.free_for(claim.key), headroom)

    def take_new_grants(self) -> set[str]:
        grants, self.new_grants = self.new_grants, set()
        return grants

    # -- holders --------------------------------------------------------------------------------------------
    def settle(self, key: str, measured: int, trusted: bool = True, footprint: Footprint | None = None) -> int:
        """After load: the measured footprint replaces the estimate if ``trusted`` (authoritative for every kind of
        memory the server uses), else the larger of the two; returns the reservation it was admitted with."""
        claim = self.holders.get(key)
        if claim is None:
            return 0
        self.loading.discard(key)
        # what it really uses, even above its reservation: it is in use
        self.ledger.set(key, measured if trusted else max(claim.need, measured))
        self._settle_gpus(claim, trusted, footprint, high_water=False)
        return claim.need

    def observe(self, key: str, measured: int, trusted: bool = True, footprint: Footprint | None = None) -> int:
        """A later measurement: the hold is the high-water mark since load (memory used once is used again)."""
        claim = self.holders.get(key)
        if claim is None or key in self.loading:
            return self.ledger.held.get(key, 0)
        floor = 0 if trusted else claim.need
        self.ledger.set(key, max(self.ledger.held.get(key, 0), measured, floor))
        self._settle_gpus(claim, trusted, footprint, high_water=True)
        return self.ledger.held[key]

    def _settle_gpus(self, claim: Claim, trusted: bool, footprint: Footprint | None, high_water: bool) -> None:
        if footprint is not None and footprint.uses_device:
            measured = {i: f.bytes for i, f in footprint.devices.items()}
            claim.gpus = gpu_ledgers.settle(
                self.gpu_ledgers, claim.key, claim.gpus, claim.share, measured, trusted, high_water
            )

    def forget(self, key: str) -> int:
        """The unit is gone, failed or stopped: leave the queue and release what it held."""
        if self._dequeue(key):
            self._settled = None  # it may have held others back
        self.new_grants.discard(key)
        return self._unhold(key)

    def requeue(self, claim: Claim, reason: str, message: str) -> None:
        """An evicted unit waits again, keeping its place in the queue."""
        claim.reason, claim.message = reason, message
        self._enqueue(claim)
        self._settled = None

    # -- pressure and budget --------------------------------------------------------------------------------
    def block(self, why: str) -> None:
        self.blocked, self._settled = why, None

    def unblock(self) -> None:
        self.blocked, self._settled = None, None
        for claim in self.waiting.values():
            claim.reason = INSUFFICIENT_MEMORY

    def evict_for(self, need_bytes: int, ledger: Ledger | None = None) -> list[Claim]:
        """Choose holders to stop so that ``need_bytes`` come free (in ``ledger``, the host's by default); they keep
        their hold until ``forget``."""
        ledger = ledger or self.ledger
        candidates = [
            Candidate(c.key, c.rank, c.protected, ledger.held.get(c.key, 0), c.seq)
            for c in self.holders.values()
            if c.key not in self.evicting and ledger.held.get(c.key, 0) > 0
        ]
        victims = [self.holders[v.key] for v in choose_victims(candidates, need_bytes)]
        self.evicting.update(v.key for v in victims)
        self.counts["evicted"] += len(victims)
        return victims

    def set_capacity(self, capacity: int) -> list[Claim]:
        """A new host budget; if what is held no longer fits, the holders to evict (by the eviction order)."""
        self.ledger.resize(capacity)
        staying = self.ledger.used - sum(self.ledger.held.get(k, 0) for k in self.evicting)
        return self.evict_for(staying - capacity) if staying > capacity else []

    # -- GPUs -----------------------------------------------------------------------------------------------
    def observe_gpus(self, free: dict[int, int]) -> None:
        """What each GPU has free now by its driver, whoever uses the rest: room on a device never exceeds it."""
        if free != self.device_free:
            self.device_free = dict(free)
            self._settled = None

    def set_gpus(self, capacities: dict[int, int]) -> None:
        """The GPUs this host has and the device-memory budget of each."""
        for index, capacity in capacities.items():
            ledger = self.gpu_ledgers.get(index)
            if ledger is None:
                self.gpu_ledgers[index] = Ledger(capacity)
            else:
                ledger.resize(capacity)
        self._settled = None

    def ledgers(self) -> Iterator[tuple[Ledger, str]]:
        yield self.ledger, "host"
        for index, ledger in sorted(self.gpu_ledgers.items()):
            yield ledger, f"GPU {index}"

    @property
    def version(self) -> tuple[int, ...]:
        return (self.ledger.version, *(ledger.version for _, ledger in sorted(self.gpu_ledgers.items())))

    def _never_fits(self, need: int, device_need: int, gpu_count: int) -> str:
        capacity = self.ledger.capacity
        if need > capacity:
            return (
                f"needs {format_bytes(need)} but the whole host budget is {format_bytes(capacity)}: it can never "
                "fit on this host (reduce its context or slots, quantize the KV cache, or raise the agent's "
                "memory fraction)"
            )
        return gpu_ledgers.never_fits(self.gpu_ledgers, device_need, gpu_count)

    def _gpus_for(self, claim: Claim) -> tuple[int, ...] | None:
        headroom = self._device_headroom(claim.key)
        return gpu_ledgers.place(self.gpu_ledgers, claim.key, claim.device_need, claim.gpu_count, headroom)

    def gpus_fit_without(self, key: str, gone: list[str]) -> bool:
        """Whether ``key``'s device share would fit its GPUs once the units in ``gone`` stopped; True for a unit
        that needs no GPU memory."""
        claim = self.waiting.get(key) or self.holders.get(key)
        if claim is None or claim.device_need <= 0 or not self.gpu_ledgers:
            return True
        room = gpu_ledgers.room(self.gpu_ledgers, key, self._device_headroom(key))
        return gpu_ledgers.fits_without(self.gpu_ledgers, room, claim.share, claim.gpu_count, set(gone) - {key})

    def _device_headroom(self, excluding: str) -> dict[int, int] | None:
        return gpu_ledgers.device_headroom(self.gpu_ledgers, self.device_free, self.loading - {excluding})

    def _reserve_gpus(self, claim: Claim) -> None:
        claim.gpus = gpu_ledgers.reserve(self.gpu_ledgers, claim.key, claim.share, self._gpus_for(claim) or ())

    # -- internals ------------------------------------------------------------------------------------------
    def _enqueue(self, claim: Claim) -> None:
        self._dequeue(claim.key)
        self.waiting[claim.key] = claim
        self._ranks[claim.rank] += 1

    def _dequeue(self, key: str) -> bool:
        claim = self.waiting.pop(key, None)
        if claim is None:
            return False
        self._ranks[claim.rank] -= 1
        return True

    def _first_rank_ahead(self, claim: Claim) -> int | None:
        """The highest priority waiting above ``claim``'s, if any. Counts per rank answer the common case (nobody
        above) without a scan; a unit that can no longer fit the budget holds nobody back, as in ``grant``."""
        if not any(self._ranks[rank] > 0 for rank in range(claim.rank)):
            return None
        capacity = self.ledger.capacity
        ahead = [o.rank for o in self.waiting.values() if o.rank < claim.rank and o.need <= capacity]
        return min(ahead, default=None)

    def _unhold(self, key: str) -> int:
        for ledger in self.gpu_ledgers.values():
            ledger.release(key)
        self.holders.pop(key, None)
        self.loading.discard(key)
        self.evicting.discard(key)
        return self.ledger.release(key)

    def _os_headroom(self, available: int, excluding: str | None = None) -> int:
        promised = sum(self.ledger.held.get(k, 0) for k in self.loading if k != excluding)
        return available - promised

    def _fits(self, claim: Claim, available: int) -> bool:
        return (
            claim.need <= self.ledger.free_for(claim.key)
            and claim.need <= self._os_headroom(available, claim.key)
            and self._gpus_for(claim) is not None
        )

    def _why_not(self, claim: Claim, free: int, headroom: int) -> str:
        if claim.need <= free and claim.need <= headroom and self._gpus_for(claim) is None:
            device = self._device_headroom(claim.key)
            return gpu_ledgers.why_waiting(self.gpu_ledgers, claim.key, claim.share, claim.gpu_count, device)
        if claim.need > free:
            others = len([k for k in self.ledger.held if k != claim.key])
            return (
                f"needs {format_bytes(claim.need)}; the host budget {format_bytes(self.ledger.capacity)} has "
                f"{format_bytes(max(0, free))} free ({others} other unit(s) running or starting); "
                "it starts when memory frees"
            )
        return (
            f"needs {format_bytes(claim.need)} but the OS reports only {format_bytes(max(0, headroom))} available "
            "beyond what starting servers were promised: another process is using the memory; it starts when "
            "memory frees"
        )

    def status(self) -> dict[str, object]:
        return {
            "waiting": [c.key for c in sorted(self.waiting.values(), key=lambda c: (c.rank, c.seq))],
            "blocked": self.blocked,
            "counts": {name: self.counts[name] for name in ("admitted", "queued", "rejected", "evicted")},
            "gpus": gpu_ledgers.status(self.gpu_ledgers, self.device_free),
        }
