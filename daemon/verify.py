"""Where a copy is verified: checksums, the in-order digest, and the proof against the
ETag.

Every byte passes Azure's own check on the way in (a Content-MD5 or CRC64 on each Put
Block and Put Blob, which Azure compares with what arrived). What is proven here is
that the bytes are the source's: against S3's full-object CRC64NVME put together from
the blocks' CRC64s, a CRC S3 holds, its MD5 ETag, its multipart composite ETag (the MD5
of the parts' MD5s, rebuilt in one in-order pass or from the block IDs), or a SHA where
the ETag cannot serve. Where none can, the report says so ("size: ...")."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import zlib
from collections.abc import Callable
from typing import ClassVar

from awscrt import checksums as awscrt_checksums

from daemon.chunks import Chunks
from daemon.errors import VerificationError
from daemon.layout import Block, Plan
from daemon.objects import CHECKSUMS, ObjectInfo

AZURE_CHECKED = "etag: Azure checked the bytes against S3's MD5 as they arrived"
AZURE_CHECKED_CRC64 = (
    "checksum-crc64nvme: Azure checked the bytes against S3's CRC64NVME as they arrived"
)
SERVER_SIDE_CHECKED = "etag: Azure checked the bytes it fetched from S3 against S3's MD5"


def md5_of(data: Chunks) -> bytes:
    h = hashlib.md5()
    for chunk in data:
        h.update(chunk)
    return h.digest()


async def md5_off_loop(data: Chunks) -> bytes:
    # hashlib releases the GIL on large buffers: a thread keeps the loop serving sockets.
    if data.size < 256 * 1024:
        return md5_of(data)
    return await asyncio.to_thread(md5_of, data)


class Checksum:
    """One of S3's additional full-object checksums, computed here in object order."""

    # Cheapest first. CRC32 from zlib; CRC32C and CRC64NVME from awscrt (hardware
    # accelerated); SHA-1 and SHA-256 from hashlib.
    ALGORITHMS = CHECKSUMS
    _CRCS: ClassVar[dict[str, tuple[Callable[[bytes | bytearray, int], int], int]]] = {
        "crc32": (zlib.crc32, 4),
        "crc32c": (awscrt_checksums.crc32c, 4),
        "crc64nvme": (awscrt_checksums.crc64nvme, 8),
    }

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = None if algorithm in self._CRCS else hashlib.new(algorithm)

    @classmethod
    def for_object(cls, info: ObjectInfo, over_md5: bool = False) -> Checksum | None:
        """S3's full-object checksum to compute, if one is to be: where the ETag cannot
        prove the copy, the cheapest S3 holds; with ``over_md5``, also where it can, if a
        CRC is held (a twelfth of an MD5's CPU and more: the ETag is then the blob's
        Content-MD5 with no byte hashed for it)."""
        if info.etag_is_md5 and not over_md5:
            return None
        for algorithm in cls.ALGORITHMS:
            if info.etag_is_md5 and algorithm not in cls._CRCS:
                continue  # SHA-1 or SHA-256 costs as much as the MD5 it would save
            if info.full_checksum(algorithm) is not None:
                return cls(algorithm)
        return None

    @classmethod
    def of_blocks(cls, info: ObjectInfo, plan: Plan, crcs: list[int | None]) -> Checksum | None:
        """The object's CRC64NVME put together from its blocks' own CRC64s (Azure checked
        each as it arrived: blockcheck.py), in object order, with no byte read again:
        blocks an earlier run staged count too. None unless S3 holds a full-object
        CRC64NVME and every block's CRC64 is known."""
        if info.full_checksum("crc64nvme") is None:
            return None
        crc = 0
        for block, own in zip(plan.blocks, crcs, strict=True):
            if own is None:
                return None
            crc = awscrt_checksums.combine_crc64nvme(crc, own, block.length)
        combined = cls("crc64nvme")
        combined._crc = crc
        return combined

    def update(self, data: Chunks) -> None:
        if self._hash is not None:
            for chunk in data:
                self._hash.update(chunk)
            return
        crc = self._CRCS[self.algorithm][0]
        for chunk in data:
            self._crc = crc(chunk, self._crc)

    def value(self) -> str:
        if self._hash is not None:
            raw = self._hash.digest()
        else:
            raw = self._crc.to_bytes(self._CRCS[self.algorithm][1], "big")
        return base64.b64encode(raw).decode()


class InOrderDigest:
    """The whole object's MD5 and each part's MD5, fed in object order whatever order
    the blocks arrive in. A block waits for its turn holding its buffer, which its
    budget reservation already accounts for."""

    def __init__(
        self, plan: Plan, checksum: Checksum | None = None, whole: bool = True, parts: bool = True
    ) -> None:
        self._plan = plan
        self.checksum = checksum
        # The whole object's MD5: a single-part object's proof, or the blob's Content-MD5.
        self.whole = hashlib.md5() if whole else None
        self.parts = parts and bool(plan.parts)  # each part's MD5: the composite ETag's
        self.part_digests: list[bytes] = []
        self._part: hashlib._Hash | None = None
        self._next = 0
        # The blocks waiting for their turn, by index: each is woken once, by the one
        # before it (a Condition's notify_all woke every waiter for every block).
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def fresh(self) -> InOrderDigest:
        """One that computes the same, from the start: a checksum cannot be rewound."""
        checksum = Checksum(self.checksum.algorithm) if self.checksum is not None else None
        return InOrderDigest(self._plan, checksum, self.whole is not None, self.parts)

    async def feed(self, block: Block, data: Chunks, block_md5: bytes | None) -> None:
        """``block``'s bytes, in their turn; ``block_md5`` when the block's check was
        its MD5 (which is then its part's, where the part is this one block)."""
        if block.index != self._next:
            turn = asyncio.get_running_loop().create_future()
            self._waiting[block.index] = turn
            await turn
        await asyncio.to_thread(self._update, block, data, block_md5)
        self._next += 1
        after = self._waiting.pop(self._next, None)
        if after is not None and not after.done():
            after.set_result(None)

    def _update(self, block: Block, data: Chunks, block_md5: bytes | None) -> None:
        if self.whole is not None:
            for chunk in data:
                self.whole.update(chunk)
        if self.checksum is not None:
            self.checksum.update(data)
        if not self.parts:
            return
        blocks = self._plan.blocks
        first = block.index == 0 or blocks[block.index - 1].part != block.part
        last = block.index == len(blocks) - 1 or blocks[block.index + 1].part != block.part
        if first and last and block_md5 is not None:
            self.part_digests.append(block_md5)
            return
        if first:
            self._part = hashlib.md5()
        assert self._part is not None
        for chunk in data:
            self._part.update(chunk)
        if last:
            self.part_digests.append(self._part.digest())
            self._part = None


def verify(
    info: ObjectInfo,
    whole_md5: bytes | None,
    part_digests: list[bytes] | None,
    checksum: Checksum | None = None,
) -> str:
    """How the copy was proven equal to the source; raises VerificationError on a mismatch."""
    etag = info.etag.strip('"')
    if checksum is not None:
        want = info.checksums[checksum.algorithm]
        if checksum.value() != want:
            raise VerificationError(
                f"{info.address}: {checksum.algorithm.upper()} of the bytes read is "
                f"{checksum.value()}, S3's checksum is {want}"
            )
        return f"checksum-{checksum.algorithm}"
    if info.encrypted_etag:
        kinds = ", ".join(sorted(info.checksums)) or "none"
        return f"size: the ETag of an SSE-KMS or SSE-C object is not an MD5 (checksums: {kinds})"
    if info.md5 is not None:
        if whole_md5 is None:
            return "size: the object's MD5 could not be computed in this run"
        if whole_md5 != info.md5:
            raise VerificationError(
                f"{info.address}: MD5 of the bytes read is {whole_md5.hex()}, S3's ETag is {etag}"
            )
        return "etag"
    if info.parts and part_digests is not None and len(part_digests) == info.parts:
        composite = hashlib.md5(b"".join(part_digests)).hexdigest() + f"-{info.parts}"
        if composite != etag:
            raise VerificationError(
                f"{info.address}: composite MD5 of the parts read is {composite}, "
                f"S3's ETag is {etag}"
            )
        return "multipart-etag"
    if info.checksums:
        kinds = ", ".join(sorted(info.checksums))
        return f"size: the ETag cannot serve and S3's checksums ({kinds}) are composite"
    return "size: the ETag is not an MD5 and no part layout was available"


def proof(
    info: ObjectInfo,
    plan: Plan,
    md5s: list[bytes | None],
    digest: InOrderDigest | None,
    reused: int,
    crcs: list[int | None] | None = None,
) -> tuple[str, bytes | None]:
    """How the staged blocks prove the copy, and the blob's Content-MD5 if known. With
    ``crcs`` (the blocks' CRC64s), against S3's CRC64NVME put together from them."""
    whole = digest.whole.digest() if digest is not None and digest.whole is not None else None
    if crcs is not None:
        checksum = Checksum.of_blocks(info, plan, crcs)
    else:
        checksum = digest.checksum if digest is not None else None
    if checksum is not None:
        # The bytes are S3's: where its ETag is their MD5, that is the blob's Content-MD5.
        return verify(info, None, None, checksum), whole or info.md5
    if digest is not None:
        parts = digest.part_digests if digest.parts else [m for m in md5s if m is not None]
        return verify(info, whole, parts), whole
    if plan.one_block_per_part:
        # One block per part: the part MD5s are the block MD5s, from the block IDs.
        return verify(info, None, [m for m in md5s if m is not None]), None
    if reused:
        why = (
            f"{reused} blocks were staged by an earlier run, so the object's MD5 "
            "could not be computed in this one"
        )
    else:
        why = "verification is off (verify = false)"
    return f"size: {why}", None
