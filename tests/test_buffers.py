"""Block buffers are used again, and what is kept stays within the memory budget."""

from __future__ import annotations

from daemon.budget import Budget
from daemon.buffers import Buffers


async def test_a_buffer_given_back_is_the_next_one_of_its_size() -> None:
    budget = Budget(10)
    buffers = Buffers(budget)
    await budget.acquire(4)
    first = buffers.take(4)
    buffers.give(first)
    budget.release(4)
    await budget.acquire(4)
    assert buffers.take(4) is first
    assert buffers.take(3) is not first  # another size: a new one


async def test_kept_buffers_and_reserved_bytes_never_exceed_the_budget() -> None:
    budget = Budget(10)
    buffers = Buffers(budget)
    held = []
    for _ in range(2):  # 8 of 10 reserved, in two buffers of 4
        await budget.acquire(4)
        held.append(buffers.take(4))
    for buf in held:
        buffers.give(buf)
        budget.release(4)
    assert buffers.kept == 8
    await budget.acquire(6)  # a block of another size: the kept 4s make room
    buffers.take(6)
    assert buffers.kept + budget.used <= budget.capacity
    await budget.acquire(2)
    buf = buffers.take(2)  # 8 reserved: the last kept 4 goes
    assert buffers.kept == 0
    buffers.give(buf)
    assert buffers.kept == 2 and buffers.kept + budget.used <= budget.capacity
