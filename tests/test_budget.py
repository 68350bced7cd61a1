from __future__ import annotations

import asyncio

import pytest

from daemon.budget import ByteBudget


async def test_waits_in_order_and_never_exceeds() -> None:
    budget = ByteBudget(100)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        async with budget.hold(n):
            order.append(name)
            assert budget.used <= budget.capacity
            await asyncio.sleep(0.01)

    await budget.acquire(90)
    tasks = [asyncio.create_task(take("big", 60)), asyncio.create_task(take("small", 5))]
    await asyncio.sleep(0.01)
    assert order == []  # "small" would fit, but must not overtake "big"
    budget.release(90)
    await asyncio.gather(*tasks)
    assert order == ["big", "small"]
    assert budget.used == 0 and budget.peak == 90


async def test_oversized_request_goes_alone() -> None:
    budget = ByteBudget(10)
    async with budget.hold(50):
        assert budget.used == 50
    assert budget.used == 0


async def test_cancelled_waiter_gives_nothing_away() -> None:
    budget = ByteBudget(10)
    await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(5))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    budget.release(10)
    assert budget.used == 0
    await budget.acquire(10)
    assert budget.used == 10
