"""Device memory in admission: one ledger per GPU, and where a unit's share of device memory goes.

llama.cpp splits a model's layers over the GPUs it sees (its default layer split), so a unit on ``gpu_count``
GPUs asks each for an equal share of its device estimate. It goes to the GPUs with the most room; it can never
fit when fewer than ``gpu_count`` GPUs have a budget as large as its share. The functions work on the ledgers
``Admission`` keeps (GPU index -> ``Ledger``) and never await, like the rest of admission.
"""

from __future__ import annotations

from agent.memory.ledger import Ledger
from agent.util.quantity import format_bytes

Ledgers = dict[int, Ledger]


def share(device_need: int, gpu_count: int) -> int:
    """What a unit asks of each of its GPUs (rounded up)."""
    return -(-device_need // max(1, gpu_count))


def never_fits(ledgers: Ledgers, device_need: int, gpu_count: int) -> str:
    """Why ``device_need`` over ``gpu_count`` GPUs can never fit these GPUs' budgets; empty when it can."""
    if device_need <= 0 or not ledgers:
        return ""
    each = share(device_need, gpu_count)
    budgets = sorted((ledger.capacity for ledger in ledgers.values()), reverse=True)
    if len(budgets) >= gpu_count and budgets[gpu_count - 1] >= each:
        return ""
    return (
        f"needs {format_bytes(device_need)} of GPU memory ({format_bytes(each)} on each of {gpu_count} GPU(s)) but "
        f"the largest GPU budget is {format_bytes(budgets[0])}: it can never fit on this host's GPUs (reduce its "
        "context or slots, quantize the KV cache, use more GPUs, or raise the GPU budget)"
    )


def place(ledgers: Ledgers, key: str, device_need: int, gpu_count: int) -> tuple[int, ...] | None:
    """The GPUs ``key`` would go to (those with the most room), or None if its share fits too few of them now."""
    if device_need <= 0 or not ledgers:
        return ()
    each = share(device_need, gpu_count)
    room = sorted(((ledger.free_for(key), index) for index, ledger in ledgers.items()), reverse=True)
    chosen = [index for free, index in room[:gpu_count] if free >= each]
    return tuple(sorted(chosen)) if len(chosen) == gpu_count else None


def reserve(ledgers: Ledgers, key: str, each: int, chosen: tuple[int, ...]) -> tuple[int, ...]:
    """Hold ``each`` on the chosen GPUs and nothing elsewhere (a unit admitted again may move); returns them."""
    for index, ledger in ledgers.items():
        if index in chosen:
            ledger.set(key, each)
        else:
            ledger.release(key)
    return chosen


def settle(
    ledgers: Ledgers,
    key: str,
    gpus: tuple[int, ...],
    each: int,
    measured: dict[int, int],
    trusted: bool,
    high_water: bool,
) -> tuple[int, ...]:
    """Hold what was measured on each GPU (at least the share where the figure is not ``trusted``; the high-water
    mark for later probes); returns the GPUs the unit now holds memory on."""
    for index in set(gpus) | set(measured):
        ledger = ledgers.get(index)
        if ledger is None:
            continue
        value = measured.get(index, 0)
        if not trusted and index in gpus:
            value = max(value, each)
        if high_water:
            value = max(value, ledger.held.get(key, 0))
        ledger.set(key, value)
    return tuple(sorted(set(gpus) | {index for index in measured if index in ledgers}))


def why_waiting(ledgers: Ledgers, key: str, each: int, gpu_count: int) -> str:
    free = ", ".join(
        f"GPU {index} has {format_bytes(max(0, ledger.free_for(key)))} free"
        for index, ledger in sorted(ledgers.items())
    )
    return f"needs {format_bytes(each)} of GPU memory on each of {gpu_count} GPU(s); {free}; it starts when it frees"


def status(ledgers: Ledgers) -> dict[str, dict[str, object]]:
    return {
        str(index): {"budget_bytes": ledger.capacity, "reserved_bytes": ledger.used, "held": dict(ledger.held)}
        for index, ledger in sorted(ledgers.items())
    }
