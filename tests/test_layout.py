"""Block layouts and their names: a later run must recognise, from the block IDs Azure
holds, the layout an earlier run cut the same object in, whatever block size it has."""

from __future__ import annotations

import hashlib

import pytest

from daemon.layout import MAX_BLOCKS, Plan, earlier_plan, held_blocks, plan_blocks, plan_layout
from daemon.objects import ObjectInfo
from tests.helpers import MiB

SINGLE = ObjectInfo("b", "k.bin", 100 * MiB + 5, '"' + "ab" * 16 + '"')
PARTS = [8 * MiB] * 12 + [3 * MiB]
MULTI = ObjectInfo("b", "k.bin", sum(PARTS), '"' + "cd" * 16 + '-13"')
# 40 parts of 32 MiB: each cut into several blocks at small block sizes
BIG_PARTS = [32 * MiB] * 40
SPLIT = ObjectInfo("b", "s.bin", sum(BIG_PARTS), '"' + "ef" * 16 + '-40"')


def ids(plan: Plan) -> dict[str, int]:
    """The staged blocks of a whole plan, as Azure lists them: {ID: size}."""
    return {plan.block_id(b.index, bytes(16)): b.length for b in plan.blocks}


@pytest.mark.parametrize(
    ("info", "parts", "flavour"),
    [
        (SINGLE, None, "stream"),
        (MULTI, PARTS, "stream"),
        (SPLIT, BIG_PARTS, "stream"),
        (SINGLE, None, "server-side"),
    ],
    ids=["single-part", "part-per-block", "parts-split", "server-side"],
)
@pytest.mark.parametrize("mib", [1, 4, 5, 16])
def test_a_layout_is_rebuilt_from_its_block_size_alone(
    info: ObjectInfo, parts: list[int] | None, flavour: str, mib: int
) -> None:
    plan = plan_blocks(info, mib * MiB, parts, flavour)
    again = plan_layout(info, plan.block_size, parts if plan.parts else None, flavour)
    assert again == plan
    assert len(plan.id_prefix) == 24 and plan.id_prefix[20:] == f"{plan.block_size // MiB:04x}"


def test_the_50000_block_limit_still_grows_the_blocks() -> None:
    huge = ObjectInfo("b", "h.bin", 400 * 1024 * MiB, '"' + "ab" * 16 + '"')
    plan = plan_blocks(huge, 4 * MiB)
    assert len(plan.blocks) <= MAX_BLOCKS and plan.block_size == 9 * MiB
    parts = [100 * MiB] * 4096
    multi = ObjectInfo("b", "h.bin", sum(parts), '"' + "ab" * 16 + '-4096"')
    plan = plan_blocks(multi, 4 * MiB, parts)
    assert plan.parts == 4096 and len(plan.blocks) <= MAX_BLOCKS
    assert plan_layout(multi, plan.block_size, parts) == plan


@pytest.mark.parametrize(
    ("info", "parts"), [(SINGLE, None), (MULTI, PARTS), (SPLIT, BIG_PARTS)], ids=str
)
def test_a_run_with_another_block_size_finds_the_earlier_layout_and_its_blocks(
    info: ObjectInfo, parts: list[int] | None
) -> None:
    before = plan_blocks(info, 1 * MiB, parts)
    now = plan_blocks(info, 4 * MiB, parts)
    assert before.id_prefix != now.id_prefix and before.block_size != now.block_size
    found = earlier_plan(before.id_prefix, now, info, parts, "stream")
    assert found == before
    staged = ids(before)
    assert held_blocks(found, staged).keys() == {b.index for b in before.blocks}
    assert held_blocks(now, staged) == {}  # what the old code saw: nothing, so it began again


def test_another_objects_or_versions_or_routes_layouts_are_not_taken_up() -> None:
    now = plan_blocks(SINGLE, 4 * MiB)
    for other in (
        ObjectInfo("b", "other.bin", SINGLE.size, SINGLE.etag),
        ObjectInfo("b", SINGLE.key, SINGLE.size, '"' + "99" * 16 + '"'),  # overwritten
        ObjectInfo("b", SINGLE.key, SINGLE.size, SINGLE.etag, version_id="v2"),
    ):
        prefix = plan_blocks(other, 1 * MiB).id_prefix
        assert earlier_plan(prefix, now, SINGLE, None, "stream") is None
    server_side = plan_blocks(SINGLE, 1 * MiB, flavour="server-side").id_prefix
    assert earlier_plan(server_side, now, SINGLE, None, "stream") is None
    identity = now.id_prefix[:19]
    for junk in ("u" + "zzzz", "x0001", "u0000", "u0fa1", "a0001"):  # bad, 0, > 4000 MiB, no parts
        assert earlier_plan(identity + junk, now, SINGLE, None, "stream") is None


def test_blocks_an_earlier_blobferry_named_are_taken_up_at_this_runs_size() -> None:
    """Before layouts were named, the prefix hashed the block size in with the object's
    identity: after an upgrade, a transfer half staged goes on where it was."""
    now = plan_blocks(MULTI, 4 * MiB, PARTS)
    legacy = "\n".join(("b", "k.bin", MULTI.etag, "", str(MULTI.size), str(now.block_size)))
    prefix = hashlib.sha256(legacy.encode()).hexdigest()[:24]
    found = earlier_plan(prefix, now, MULTI, PARTS, "stream")
    assert found is not None and found.id_prefix == prefix
    assert (found.blocks, found.block_size, found.parts) == (now.blocks, now.block_size, now.parts)
