from __future__ import annotations

import asyncio

import pytest

from daemon.budget import Budget


async def test_waits_in_order_and_never_exceeds() -> None:
    budget = Budget(100)
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
    budget = Budget(10)
    async with budget.hold(50):
        assert budget.used == 50
    assert budget.used == 0


async def test_cancelled_waiter_gives_nothing_away() -> None:
    budget = Budget(10)
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


async def test_shrinking_takes_nothing_back_and_admits_no_one_until_under() -> None:
    """A reload lowers the bound: holders keep their units, and waiters get in only
    once what is held fits under the new capacity."""
    slots = Budget(4)
    for _ in range(4):
        await slots.acquire(1)
    slots.resize(2)
    assert slots.used == 4  # nothing cancelled, nothing given back
    waiter = asyncio.create_task(slots.acquire(1))
    for _ in range(2):
        slots.release(1)
        await asyncio.sleep(0)
        assert not waiter.done()  # 3, then 2 held: full under the new bound
    slots.release(1)
    await waiter
    assert slots.used == 2


async def test_growing_lets_waiters_in_at_once_in_order() -> None:
    slots = Budget(1)
    await slots.acquire(1)
    order: list[int] = []

    async def take(i: int) -> None:
        await slots.acquire(1)
        order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == []
    slots.resize(3)  # two more: the first two waiters, in their order
    await asyncio.sleep(0)
    assert order == [0, 1] and slots.used == 3
    slots.release(1)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    with pytest.raises(ValueError):
        slots.resize(0)


async def test_a_waiter_granted_as_it_is_cancelled_hands_its_units_back() -> None:
    budget = Budget(1)
    await budget.acquire(1)
    waiter = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0)
    budget.release(1)  # granted: its future is done, its task not yet resumed ...
    waiter.cancel()  # ... and cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.used == 0
