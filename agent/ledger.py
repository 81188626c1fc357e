"""Reservations of host memory by serving units.

Every starting or running server holds a reservation; admission checks the sum of all reservations plus the
new estimate against the host budget. Methods never await, so on the event loop each call is atomic: two
units arriving together cannot both see the same free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ledger:
    capacity: int
    held: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def free_for(self, key: str) -> int:
        """What ``key`` could hold: the capacity less everyone else's reservations."""
        return self.capacity - (self.used - self.held.get(key, 0))

    def reserve(self, key: str, amount: int) -> bool:
        """Hold ``amount`` for ``key`` (replacing what it held) if it fits; False, holding nothing new, if not."""
        if amount > self.free_for(key):
            return False
        self.held[key] = amount
        return True

    def release(self, key: str) -> int:
        return self.held.pop(key, 0)
