"""Where a block is cut, and what it is called: the block layout of an object, its
block IDs, and resume's reading of the blocks an earlier run staged.

A block ID is 62 characters: 24 of prefix, a 6-digit index and the block's fingerprint
in hex (its MD5, or its CRC64 padded to 16 bytes: blockcheck.py).
The prefix is 19 hex digits of a hash of the object's version (bucket, key, ETag,
version, size) and the route, then ``a`` or ``u`` (cut inside S3's parts or not) and
the block size in MiB as 4 hex digits. So a later run recognises the blocks it staged
for this version of this object, in whatever layout (block_size_mb may have changed in
between), and never mistakes another's; and where the fingerprint is the MD5 (a
multipart object cut one block per part), which Azure checked when the block arrived, it
rebuilds the object's composite ETag from Azure's block list alone, without reading a
byte again.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from daemon.objects import ObjectInfo
from daemon.settings import MiB

MAX_BLOCKS = 50_000
MAX_BLOCK_SIZE = 4000 * MiB
WHOLE_PART_MAX = 16 * MiB
ID_LENGTH = 24 + 6 + 32  # identity, index, MD5: every ID the same length, as Azure requires
SENT_LENGTH = len(base64.b64encode(bytes(ID_LENGTH)))  # as Azure holds it: base64


def sent_length(block_id: str) -> int:
    """A staged block's ID length as Azure compares it, base64. The SDK hands an ID back
    decoded where it decodes to text, as sent where it does not."""
    try:
        base64.b64decode(block_id, validate=True).decode()
    except UnicodeDecodeError:
        return len(block_id)  # binary underneath: handed back as sent
    except ValueError:
        pass  # not base64 at all: decoded text
    return len(base64.b64encode(block_id.encode()))


@dataclass(frozen=True, slots=True)
class Block:
    index: int
    start: int
    length: int
    part: int  # which S3 part the block lies in; 0 for a single-part object


@dataclass(frozen=True, slots=True)
class Plan:
    block_size: int
    blocks: tuple[Block, ...]
    parts: int  # the S3 parts the blocks are aligned to; 0 when not aligned
    id_prefix: str

    @property
    def one_block_per_part(self) -> bool:
        """Whether each of S3's parts is one block: the block MD5s are the part MD5s."""
        return bool(self.parts) and self.parts == len(self.blocks)

    def block_id(self, index: int, md5: bytes | None) -> str:
        assert md5 is not None, "every block has been staged before its ID is needed"
        return f"{self.id_prefix}{index:06d}{md5.hex()}"

    def parse_id(self, block_id: str) -> tuple[int, bytes] | None:
        """(index, MD5) of a block this plan staged, or None for anyone else's."""
        if len(block_id) != ID_LENGTH or not block_id.startswith(self.id_prefix):
            return None
        index, md5 = block_id[24:30], block_id[30:]
        if not index.isdigit() or int(index) >= len(self.blocks):
            return None
        try:
            return int(index), bytes.fromhex(md5)
        except ValueError:
            return None


def choose_block_size(size: int, minimum: int) -> int:
    """The smallest whole number of MiB, at least ``minimum``, that keeps a blob of
    ``size`` bytes under Azure's 50,000 blocks."""
    needed = -(-size // MAX_BLOCKS)
    needed = -(-needed // MiB) * MiB
    return min(max(minimum, needed), MAX_BLOCK_SIZE)


def plan_blocks(
    info: ObjectInfo, minimum: int, part_sizes: list[int] | None = None, flavour: str = "stream"
) -> Plan:
    """Cut the object into blocks of at least ``minimum`` bytes, as few as Azure's
    50,000 allow; inside a multipart object no block crosses a part boundary, so each
    part's MD5 (and so S3's composite ETag) falls out of one pass."""
    if _parts_known(info, part_sizes):
        assert part_sizes is not None
        bs = minimum
        while sum(-(-p // bs) for p in part_sizes) > MAX_BLOCKS:
            bs *= 2
        plan = plan_layout(info, bs, part_sizes, flavour)
        if len(plan.blocks) <= MAX_BLOCKS:
            return plan
    return plan_layout(info, choose_block_size(info.size, minimum), None, flavour)


def _parts_known(info: ObjectInfo, part_sizes: list[int] | None) -> bool:
    """Whether blocks can be cut inside S3's parts: their sizes known, and the whole."""
    return bool(part_sizes) and sum(part_sizes or ()) == info.size


def plan_layout(
    info: ObjectInfo, bs: int, part_sizes: list[int] | None, flavour: str = "stream"
) -> Plan:
    """The blocks of ``bs`` bytes, inside S3's parts when ``part_sizes`` is given. The
    ID prefix names the object's version and this layout: a later run can tell from
    Azure's list of staged blocks which layout they were cut in."""
    spans: list[tuple[int, int, int]] = []  # (start, length, part)
    if part_sizes:
        # A part up to 16 MiB (or 1.5 blocks) stays whole: one block per part, whose MD5
        # is the part's, so one pass proves the composite ETag, even after a resume.
        # Uploaders' parts are mostly 5-16 MiB (boto3 and the AWS CLI use 8).
        limit = min(MAX_BLOCK_SIZE, max(bs + bs // 2, WHOLE_PART_MAX))
        pos = 0
        for part, psize in enumerate(part_sizes):
            n = 1 if psize <= limit else -(-psize // bs)
            step = -(-psize // n)
            for off in range(0, psize, step):
                spans.append((pos + off, min(step, psize - off), part))
            pos += psize
    else:
        spans = [(s, min(bs, info.size - s), 0) for s in range(0, info.size, bs)]
    blocks = tuple(Block(i, s, n, p) for i, (s, n, p) in enumerate(spans))
    layout = "a" if part_sizes else "u"
    prefix = f"{_object_identity(info, flavour)[:19]}{layout}{bs // MiB:04x}"
    return Plan(bs, blocks, len(part_sizes) if part_sizes else 0, prefix)


def _object_identity(info: ObjectInfo, flavour: str, *more: str) -> str:
    """A hash tied to this version of the object and the way it is copied (and to
    ``more``): 19 hex digits of it begin a block ID."""
    fields = (info.bucket, info.key, info.etag, info.version_id or "", str(info.size), *more)
    identity = "\n".join(fields) + ("" if flavour == "stream" else "\n" + flavour)
    return hashlib.sha256(identity.encode()).hexdigest()


def earlier_plan(
    prefix: str, plan: Plan, info: ObjectInfo, part_sizes: list[int] | None, flavour: str
) -> Plan | None:
    """The layout staged blocks whose IDs start with ``prefix`` were cut in, when it is
    another layout of the object ``plan`` (this run's, from ``plan_blocks``; its prefix
    begins with the object's identity) is for: block_size_mb changed between two runs
    of one transfer; or ``plan``'s own layout under the prefix of an earlier blobferry,
    whose IDs hashed the block size in (an upgrade between two runs). None for any other
    prefix: another object's, another version's, another tool's."""
    if prefix.startswith(plan.id_prefix[:19]) and prefix != plan.id_prefix:  # this object's
        layout, mib = prefix[19], prefix[20:]
        if (
            layout not in ("a", "u")
            or len(mib) != 4
            or not all(c in "0123456789abcdef" for c in mib)
        ):
            return None
        bs = int(mib, 16) * MiB
        aligned = layout == "a"
        if not MiB <= bs <= MAX_BLOCK_SIZE:
            return None
        if aligned and not _parts_known(info, part_sizes):
            return None
        other = plan_layout(info, bs, part_sizes if aligned else None, flavour)
        return other if len(other.blocks) <= MAX_BLOCKS else None
    if prefix == _object_identity(info, flavour, str(plan.block_size))[:24]:
        return dataclasses.replace(plan, id_prefix=prefix)
    return None


def held_blocks(plan: Plan, staged: dict[str, int]) -> dict[int, bytes]:
    """{index: MD5} of the staged blocks (ID: size) that are ``plan``'s, at its sizes."""
    found: dict[int, bytes] = {}
    for block_id, size in staged.items():
        parsed = plan.parse_id(block_id)
        if parsed is not None and plan.blocks[parsed[0]].length == size:
            found[parsed[0]] = parsed[1]
    return found


def foreign_blocks(staged: dict[str, int]) -> int:
    """How many staged blocks another tool left: IDs of another length, beside which
    Azure takes no block of ours (every ID of a blob must be of one length)."""
    return sum(sent_length(i) != SENT_LENGTH for i in staged)


def resume_point(
    plan: Plan, staged: dict[str, int], earlier: Callable[[str], Plan | None]
) -> tuple[Plan, dict[int, bytes], str | None]:
    """The plan to go on with, the blocks of it already staged ({index: MD5}) and a
    note when an earlier run's layout is taken up. ``plan`` is this run's layout;
    ``earlier`` names the layout of another prefix of this object's (``earlier_plan``):
    the one holding the most bytes is gone on with, so a change of block_size_mb between
    two runs of a transfer of hundreds of GB does not start it again from nothing."""
    plans = [plan]
    for prefix in sorted({i[:24] for i in staged if len(i) == ID_LENGTH} - {plan.id_prefix}):
        other = earlier(prefix)
        if other is not None:
            plans.append(other)
    held = [held_blocks(p, staged) for p in plans]
    # The most bytes held wins; on a tie (nothing held, say), this run's own layout.
    k = max(range(len(plans)), key=lambda j: sum(plans[j].blocks[i].length for i in held[j]))
    chosen = plans[k]
    if k == 0 or chosen.block_size == plan.block_size:
        return chosen, held[k], None  # this run's, or an earlier blobferry's same layout
    note = (
        f"resumed in the {chosen.block_size // MiB} MiB blocks an earlier run staged "
        f"({len(held[k])} held), not the {plan.block_size // MiB} MiB this run would "
        "cut: block_size_mb changed in between"
    )
    return chosen, held[k], note
