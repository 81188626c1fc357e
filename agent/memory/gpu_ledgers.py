"""Device memory in admission: one ledger per GPU, and where a unit's share of device memory goes.

llama.cpp splits a model's layers over the GPUs it sees (its default layer split), so a unit on ``gpu_count``
GPUs asks each for an equal share of its device estimate. It goes to the GPUs with the most room; it can never
fit when fewer than ``gpu_count`` GPUs have a budget as large as its share. Room on a GPU is its budget's free part,
but no more than the device has free now (NVML: other processes' memory counted) beyond what starting servers were
promised: a card shared with other tenants is never filled past what they leave. The functions work on the ledgers
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


def device_headroom(ledgers: Ledgers, device_free: dict[int, int] | None, loading: set[str]) -> dict[int, int] | None:
    """Per GPU: what the device has free less what the ``loading`` servers were promised there (the driver does
    not count it yet; the host's rule); None where the devices were not read."""
    if device_free is None:
        return None
    return {
        index: device_free.get(index, 0) - sum(ledger.held.get(key, 0) for key in loading)
        for index, ledger in ledgers.items()
    }


def fits_without(ledgers: Ledgers, room: dict[int, int], each: int, gpu_count: int, gone: set[str]) -> bool:
    """Whether ``each`` fits ``gpu_count`` GPUs once the units in ``gone`` stopped: what they hold comes back to
    the budgets and to the devices alike."""
    after = {index: room[index] + sum(ledger.held.get(key, 0) for key in gone) for index, ledger in ledgers.items()}
    return _pick(after, each, gpu_count) is not None


def room(ledgers: Ledgers, key: str, headroom: dict[int, int] | None) -> dict[int, int]:
    """What ``key`` may take on each GPU: its budget's free part, and no more than the device has free beyond what
    starting servers were promised (``headroom``; None where the devices were not read)."""
    return {
        index: ledger.free_for(key) if headroom is None else min(ledger.free_for(key), headroom.get(index, 0))
        for index, ledger in ledgers.items()
    }


def place(
    ledgers: Ledgers, key: str, device_need: int, gpu_count: int, headroom: dict[int, int] | None = None
) -> tuple[int, ...] | None:
    """The GPUs ``key`` would go to (those with the most room), or None if its share fits too few of them now."""
    if device_need <= 0 or not ledgers:
        return ()
    return _pick(room(ledgers, key, headroom), share(device_need, gpu_count), gpu_count)


def _pick(room: dict[int, int], each: int, gpu_count: int) -> tuple[int, ...] | None:
    """The ``gpu_count`` GPUs with the most room, if each has ``each``; else None."""
    ranked = sorted(((free, index) for index, free in room.items()), reverse=True)
    chosen = [index for free, index in ranked[:gpu_count] if free >= each]
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


def why_waiting(ledgers: Ledgers, key: str, each: int, gpu_count: int, headroom: dict[int, int] | None) -> str:
    parts = []
    for index, ledger in sorted(ledgers.items()):
        budget_free = max(0, ledger.free_for(key))
        part = f"GPU {index} has {format_bytes(budget_free)} free in its budget"
        if headroom is not None and headroom.get(index, 0) < budget_free:
            part += f" but {format_bytes(max(0, headroom.get(index, 0)))} on the device (other processes use it)"
        parts.append(part)
    return (
        f"needs {format_bytes(each)} of GPU memory on each of {gpu_count} GPU(s); {'; '.join(parts)}; it starts "
        "when memory frees"
    )


def status(ledgers: Ledgers, device_free: dict[int, int] | None) -> dict[str, dict[str, object]]:
    return {
        str(index): {
            "budget_bytes": ledger.capacity,
            "reserved_bytes": ledger.used,
            "held": dict(ledger.held),
            "device_free_bytes": None if device_free is None else device_free.get(index),
        }
        for index, ledger in sorted(ledgers.items())
    }
