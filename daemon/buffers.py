"""Block buffers, used again.

Why, measured with py-spy on wan-256: a fresh bytearray of a block's size is zeroed,
and the allocator maps and unmaps buffers this large, so each 4 KiB of it page-faults
on first touch: a quarter of the daemon's CPU. A buffer comes back here when its block
has landed, and the next block of its size takes it.

What is kept is bounded by the memory budget: buffers kept and bytes reserved together
never exceed it, so payload memory stays within memory_mb as before.
"""

from __future__ import annotations

from daemon.budget import Budget


class Buffers:
    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._free: dict[int, list[bytearray]] = {}
        self.kept = 0

    def take(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes, whose size the caller has reserved in the budget."""
        free = self._free.get(n)
        if free:
            self.kept -= n
            return free.pop()
        # A size none is kept of: the kept buffers of other sizes make room first.
        for size, bufs in self._free.items():
            while bufs and self.kept + self._budget.used > self._budget.capacity:
                bufs.pop()
                self.kept -= size
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        """``buf`` back, before its block's reservation is released (which still counts
        it): kept while that fits the budget."""
        if self.kept + self._budget.used <= self._budget.capacity:
            self._free.setdefault(len(buf), []).append(buf)
            self.kept += len(buf)
