"""A budget of units shared by many tasks: the one bound both limits are made of.

The engine's holds bytes: a block reserves its size before its first byte is read and
gives it back once it is staged. The supervisor's holds transfers: one unit per object
in flight (``max_transfers``). Waiters are served first come, first served, so one large
block cannot be starved by a stream of small ones. A request larger than the whole
budget is let through alone, when nothing else holds any, so an oversized block still
makes progress instead of deadlocking.

A reload resizes a budget in place (``resize``). Growing it lets waiters in at once;
shrinking it takes nothing back from those holding units: they finish, and no one new
is let in until the holdings are under the new capacity. So lowering ``memory_mb`` or
``max_transfers`` never cancels a block or a transfer, and holds within one block's or
one transfer's time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Budget:
    def __init__(self, capacity: int) -> None:
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.peak = 0
        self.capacity = 0
        self.resize(capacity)

    @property
    def used(self) -> int:
        return self._used

    def resize(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._wake()

    def _fits(self, n: int) -> bool:
        return self._used + n <= self.capacity or self._used == 0

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted just as we were cancelled: hand the bytes back.
                self.release(n)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def _take(self, n: int) -> None:
        self._used += n
        self.peak = max(self.peak, self._used)

    def release(self, n: int) -> None:
        self._used -= n
        assert self._used >= 0, "released more than was acquired"
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)
