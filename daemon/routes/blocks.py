"""The blocks route: the object cut into blocks (layout.py), each read with a ranged
GET, staged with Put Block and checked by Azure against its CRC64 or MD5, many at once;
then one Put Block List commits them in order.

A block's bytes live in one buffer, from the ranged GET that fills it until Azure has
acknowledged it; its size is reserved in the shared Budget first, and at most
block_concurrency blocks of one object are in flight. Azure checks each block against
its MD5 or CRC64 (blockcheck.py). Blocks an earlier run staged are found in Azure's
block list and not read again (resume). The object is proven by the cheapest means
S3's metadata allows (``_Means``, verify.py): its CRC64NVME from the blocks' CRC64s, the
part MD5s the blocks carry, or one in-order pass over the bytes; a block that arrived
damaged from S3 is read and staged again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cached_property, partial

import structlog

from daemon.addresses import AzAddress
from daemon.blockcheck import Kind, compute_off_loop, crc64_of
from daemon.buffers import Buffers
from daemon.errors import Interrupted, VerificationError
from daemon.layout import Block, Plan, earlier_plan, plan_blocks
from daemon.objects import ObjectInfo
from daemon.outcome import Outcome, Progress, Status, unwatched
from daemon.retry import retrying
from daemon.routes.base import Handoff, Route, first_error
from daemon.settings import Settings
from daemon.verify import Checksum, InOrderDigest, proof

log = structlog.get_logger("blobferry.transfer")


class Blocks(Route):
    name = "blocks"

    @cached_property
    def _buffers(self) -> Buffers:
        """The blocks' buffers, used again (buffers.py), within the route's budget."""
        return Buffers(self._budget)

    async def copy(self, h: Handoff) -> Outcome:
        info, spec, progress = h.known, h.spec, h.progress
        dst = spec.destination
        part_sizes = (
            await retrying(
                lambda: self._source.part_sizes(info),
                self._settings.retry,
                f"part sizes {info.address}",
            )
            if info.parts
            else None
        )
        cut = plan_blocks(info, self._settings.block_size, part_sizes)
        plan, staged, cleared = await self.staged(
            cut, dst, lambda prefix: earlier_plan(prefix, cut, info, part_sizes, "stream")
        )
        # Each block's fingerprint (blockcheck.py): from its ID when staged before.
        md5s: list[bytes | None] = [staged.get(b.index) for b in plan.blocks]
        reused = sum(m is not None for m in md5s)
        todo = [b for b in plan.blocks if md5s[b.index] is None]
        if reused:
            progress(sum(b.length for b in plan.blocks) - sum(b.length for b in todo), reused=True)
        means = _Means.of(info, plan, md5s, self._settings)
        digest = means.digest(plan) if not reused else None
        await self._stage_all(info, dst, plan, todo, md5s, means.kind, digest, progress)
        note = None
        try:
            verified, md5 = proof(info, plan, md5s, digest, reused, means.crcs(md5s))
        except VerificationError as e:
            if reused and means.by_pass:
                raise  # the in-order pass cannot be had without every block
            verified, md5, note = await self._repair(e, info, dst, plan, md5s, digest, means)
        note = "; ".join(n for n in (cleared, note) if n) or None
        ids = [plan.block_id(b.index, m) for b, m in zip(plan.blocks, md5s, strict=True)]
        landing = await self.commit(info, h, ids, md5)
        return Outcome(
            Status.COPIED,
            info.size,
            verified,
            note,
            landing=landing,
            blocks_reused=reused,
            route=self.name,
        )

    async def _repair(
        self,
        e: VerificationError,
        info: ObjectInfo,
        dst: AzAddress,
        plan: Plan,
        md5s: list[bytes | None],
        digest: InOrderDigest | None,
        means: _Means,
    ) -> tuple[str, bytes | None, str]:
        """Something was damaged between S3 and here (Azure checked the rest): the whole
        object is read once more, and only blocks whose bytes differ are staged again.
        Returns the proof, the blob's MD5 and a note of how many were."""
        log.warning("verification failed, reading again", error=str(e))
        first = list(md5s)
        if digest is not None:
            digest = digest.fresh()
        again = list(plan.blocks)
        await self._stage_all(info, dst, plan, again, md5s, means.kind, digest, unwatched, first)
        damaged = sum(a != b for a, b in zip(first, md5s, strict=True))
        verified, md5 = proof(info, plan, md5s, digest, 0, means.crcs(md5s))
        return verified, md5, f"{damaged} block(s) arrived damaged from S3 and were read again"

    async def _stage_all(
        self,
        info: ObjectInfo,
        dst: AzAddress,
        plan: Plan,
        todo: list[Block],
        md5s: list[bytes | None],
        kind: Kind,
        digest: InOrderDigest | None,
        progress: Progress,
        known: list[bytes | None] | None = None,
    ) -> None:
        """Read, stage and digest ``todo``, filling ``md5s``. With ``known`` (a repair
        pass), a block whose MD5 matches the one already staged is not sent again."""
        lanes = asyncio.Semaphore(self._settings.block_concurrency)
        interrupted = False
        try:
            async with asyncio.TaskGroup() as tg:
                for block in todo:
                    # Back-pressure here, before a task exists: a huge object never has
                    # more than block_concurrency tasks or its budget share in flight.
                    await lanes.acquire()
                    try:
                        await self._budget.acquire(block.length)
                    except BaseException:
                        lanes.release()
                        raise
                    if self._stopping.is_set():
                        self._block_done(block.length, lanes, None)
                        interrupted = True
                        break
                    buf = self._buffers.take(block.length)
                    task = tg.create_task(
                        self._one_block(
                            info,
                            dst,
                            plan,
                            block,
                            buf,
                            md5s,
                            kind,
                            digest,
                            progress,
                            known[block.index] if known else None,
                        )
                    )
                    # Given back when the task ends however it ends: a task cancelled
                    # before its first step (a job cancelled) never runs a finally.
                    task.add_done_callback(partial(self._block_done, block.length, lanes, buf))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        if interrupted:
            # The blocks in flight have landed; the rest are read on the next start.
            raise Interrupted()

    async def _one_block(
        self,
        info: ObjectInfo,
        dst: AzAddress,
        plan: Plan,
        block: Block,
        buf: bytearray,
        md5s: list[bytes | None],
        kind: Kind,
        digest: InOrderDigest | None,
        progress: Progress,
        known: bytes | None,
    ) -> None:
        data = await retrying(
            lambda: self._source.read_range(info, block.start, block.length, buf),
            self._settings.retry,
            f"read {info.address} block {block.index}",
        )
        check = await compute_off_loop(kind, data)
        block_id = plan.block_id(block.index, check.fingerprint)
        async with asyncio.TaskGroup() as both:
            if check.fingerprint != known:
                both.create_task(
                    retrying(
                        lambda: self._sink.stage(dst, block_id, data, check),
                        self._settings.retry,
                        f"stage {dst} block {block.index}",
                    )
                )
            if digest is not None:
                both.create_task(digest.feed(block, data, check.md5))
        md5s[block.index] = check.fingerprint
        progress(block.length)

    def _block_done(
        self, n: int, lanes: asyncio.Semaphore, buf: bytearray | None, _: object = None
    ) -> None:
        """A block's buffer, budget share and lane, given back (its task's done
        callback). Nothing holds the buffer by now: the block's task and the requests it
        made have ended, and a request abandoned mid-body closed its connection."""
        if buf is not None:
            self._buffers.give(buf)
        self._budget.release(n)
        lanes.release()


@dataclass(frozen=True, slots=True)
class _Means:
    """How an object's copy is proven, settled before its first block is read. Cheapest
    first: S3's CRC64NVME put together from the blocks' own CRC64s (no byte hashed for
    it); the part MD5s the blocks carry (one block per part); then an in-order pass over
    the bytes for S3's CRC, the whole MD5 or the part MD5s. Where S3's ETag is the MD5
    and a checksum proves the bytes, the ETag is the blob's Content-MD5 unhashed."""

    kind: Kind  # what each block carries for Azure to check (blockcheck.py)
    by_blocks: bool
    checksum: str | None  # S3's checksum, computed in the pass
    whole: bool  # the whole MD5, in the pass: the proof, or the Content-MD5 asked for
    parts: bool  # the part MD5s, in the pass (parts cut into several blocks)
    by_pass: bool  # the proof is the in-order pass, which needs every block's bytes
    verify: bool

    @classmethod
    def of(
        cls, info: ObjectInfo, plan: Plan, staged: list[bytes | None], settings: Settings
    ) -> _Means:
        by_blocks = (
            settings.verify
            and Kind(settings.azure.block_check) is Kind.CRC64
            and info.full_checksum("crc64nvme") is not None
            and all(m is None or crc64_of(m) is not None for m in staged)
        )
        # With S3's CRC64NVME, CRC64s even where the blocks are the parts: their MD5s
        # would prove the composite ETag, at twelve times the CPU.
        kind = Kind.CRC64 if by_blocks else Kind.of(plan, settings.azure.block_check)
        checksum = None
        if not by_blocks and not plan.one_block_per_part:
            found = Checksum.for_object(info, over_md5=True)
            checksum = found.algorithm if found is not None else None
        proven = by_blocks or plan.one_block_per_part or checksum is not None
        md5_known = info.md5 is not None and (by_blocks or checksum is not None)
        return cls(
            kind=kind,
            by_blocks=by_blocks,
            checksum=checksum,
            whole=(settings.content_md5 and not md5_known) or not (proven or plan.parts),
            parts=not proven and bool(plan.parts),
            by_pass=not (by_blocks or plan.one_block_per_part),
            verify=settings.verify,
        )

    def digest(self, plan: Plan) -> InOrderDigest | None:
        if not self.verify or not (self.whole or self.parts or self.checksum):
            return None
        checksum = Checksum(self.checksum) if self.checksum is not None else None
        return InOrderDigest(plan, checksum, self.whole, self.parts)

    def crcs(self, fingerprints: list[bytes | None]) -> list[int | None] | None:
        if not self.by_blocks:  # which holds only with verify on
            return None
        return [crc64_of(m) for m in fingerprints]
