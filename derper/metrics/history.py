"""The status page's memory: counter snapshots in fixed-size rings, and when counters last moved.

Pure: the sampler (``status.py``) decides when to take a snapshot. A ring's arrays are allocated
once at its full size and then overwritten oldest first, so a relay that runs for months keeps
exactly as much history as one that started a minute ago.
"""

from __future__ import annotations

from array import array
from typing import Mapping, Sequence


class Ring:
    """The last ``capacity`` snapshots of the same named values, taken every ``step`` seconds."""

    def __init__(self, names: Sequence[str], capacity: int, step: float) -> None:
        self.names = tuple(names)
        self.capacity = capacity
        self.step = step
        self._times = array("d", bytes(8 * capacity))
        self._columns = {name: array("d", bytes(8 * capacity)) for name in self.names}
        self._next = 0  # the slot the next snapshot overwrites
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, t: float, values: Sequence[float]) -> None:
        """One snapshot at time ``t`` (later than the last), values in ``names`` order."""
        i = self._next
        self._times[i] = t
        for column, value in zip(self._columns.values(), values, strict=True):
            column[i] = value
        self._next = (i + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def _slots(self) -> list[int]:
        """Slot indices, oldest snapshot first."""
        first = (self._next - self._count) % self.capacity
        return [(first + k) % self.capacity for k in range(self._count)]

    def times(self) -> list[float]:
        return [self._times[i] for i in self._slots()]

    def column(self, name: str) -> list[float]:
        column = self._columns[name]
        return [column[i] for i in self._slots()]

    def at_or_before(self, t: float) -> tuple[float, dict[str, float]] | None:
        """The newest snapshot taken at or before ``t`` (else the oldest one), or None if empty:
        what a counter said about then, to subtract from its value now."""
        slots = self._slots()
        if not slots:
            return None
        found = next((i for i in reversed(slots) if self._times[i] <= t), slots[0])
        return self._times[found], {name: col[found] for name, col in self._columns.items()}

    def series(self, *, rates: Mapping[str, str], gauges: Mapping[str, str],
               after: float = float("-inf")) -> dict[str, list[float]]:
        """Chart columns: ``t`` (the later snapshot of each neighbouring pair), each gauge as
        sampled, and each counter as its per-second rate between the two snapshots; only the
        points later than ``after``, and only those are computed (a refresh asks for a few).
        Keys are the mappings' keys; values name the ring's columns."""
        slots, t = self._slots(), self._times
        start = len(slots)
        while start > 1 and t[slots[start - 1]] > after:
            start -= 1
        pairs = list(zip(slots[start - 1:], slots[start:]))  # (previous, this) snapshot
        out: dict[str, list[float]] = {"t": [t[i] for _, i in pairs]}
        for key, name in gauges.items():
            column = self._columns[name]
            out[key] = [column[i] for _, i in pairs]
        for key, name in rates.items():
            column = self._columns[name]
            out[key] = [(column[i] - column[p]) / (t[i] - t[p]) for p, i in pairs]
        return out


class LastChange:
    """When each counter was last seen to go up (to the sampling step): the counters themselves
    carry no time, and the hot path must not read a clock to give them one."""

    def __init__(self) -> None:
        self._previous: dict[str, float] = {}
        self.at: dict[str, float] = {}

    def observe(self, t: float, values: Mapping[str, float]) -> None:
        """Counters start at zero, so anything counted before the first observation is dated
        to it."""
        previous = self._previous
        for name, value in values.items():
            if value > previous.get(name, 0):
                self.at[name] = t
            previous[name] = value
