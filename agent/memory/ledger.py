"""Reservations of host memory by serving units.

Every starting or running server holds a reservation; admission checks the sum of all reservations plus the
new estimate against the host budget. Methods never await, so on the event loop each call is atomic: two
units arriving together cannot both see the same free memory. The sum is kept as it changes (admission asks for
it once per waiting unit), and ``version`` tells a caller whether anything changed since it last looked.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ledger:
    capacity: int
    held: dict[str, int] = field(default_factory=dict)
    version: int = 0
    _used: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._used = sum(self.held.values())

    @property
    def used(self) -> int:
        return self._used

    def free_for(self, key: str) -> int:
        """What ``key`` could hold: the capacity less everyone else's reservations."""
        return self.capacity - (self._used - self.held.get(key, 0))

    def reserve(self, key: str, amount: int) -> bool:
        """Hold ``amount`` for ``key`` (replacing what it held) if it fits; False, holding nothing new, if not."""
        if amount > self.free_for(key):
            return False
        self.set(key, amount)
        return True

    def set(self, key: str, amount: int) -> None:
        """Hold ``amount`` for ``key`` whatever the capacity: memory that is in use already (measured, adopted)."""
        self._used += amount - self.held.get(key, 0)
        self.held[key] = amount
        self.version += 1

    def release(self, key: str) -> int:
        if key not in self.held:
            return 0
        amount = self.held.pop(key)
        self._used -= amount
        self.version += 1
        return amount

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self.version += 1
