"""The server-side route: Azure fetches every block itself from a URL presigned for it
(Put Block From URL), and no payload byte passes through this host.

Where Azure cannot reach the bucket (a bucket policy that admits only a VPC endpoint
or some addresses), the object streams through here instead and the report says why;
that answer is believed for the bucket a while, so a prefix of small objects does not
ask it of every one. Azure's GETs of S3 carry no If-Match: a versioned object's URLs
name its version, and otherwise the ETag is asked again before the commit, so a blob
never mixes two versions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from daemon.budget import Budget
from daemon.errors import Interrupted, SourceUnreachableError
from daemon.jobs import TransferSpec
from daemon.layout import Block, Plan, earlier_plan, plan_blocks
from daemon.objects import ObjectInfo
from daemon.outcome import Outcome, Progress, Status
from daemon.retry import retrying
from daemon.routes.base import Handoff, Route, first_error
from daemon.seams import BlobSink, ObjectSource
from daemon.settings import Settings
from daemon.verify import SERVER_SIDE_CHECKED

SourceUrls = Callable[[ObjectInfo], Awaitable[str]]
Fallback = Callable[[Handoff], Awaitable[Outcome]]
SERVER_SIDE_MD5 = bytes(16)  # server-side blocks: no bytes here, so no MD5 in the ID
UNREACHABLE_FOR_S = 300.0  # how long "Azure cannot reach this bucket" is believed
log = structlog.get_logger("blobferry.transfer")


class ServerSide(Route):
    name = "server-side"

    def __init__(
        self,
        settings: Settings,
        source: ObjectSource,
        sink: BlobSink,
        budget: Budget,
        stopping: asyncio.Event,
        fallback: Fallback,
        source_urls: SourceUrls | None = None,
    ) -> None:
        super().__init__(settings, source, sink, budget, stopping)
        self._fallback = fallback  # where an object goes when Azure cannot reach S3
        # Where Azure fetches ranges from: a URL presigned for each block just before
        # it is staged. A seam, so a test can point Azure at a source it can reach
        # (Azurite only fetches from itself).
        self._source_urls: SourceUrls = source_urls or source.presign
        # Buckets Azure could not fetch from: (when, its answer).
        self._unreachable: dict[str, tuple[float, str]] = {}

    async def copy(self, h: Handoff) -> Outcome:
        """Azure fetches the object itself; where it cannot reach the bucket, the object
        streams through here (``fallback``) and the report says why. That answer is
        remembered for the bucket a while, so a prefix of small objects does not ask it
        of every one."""
        info = h.known
        seen = self._unreachable.get(info.bucket)
        if seen is not None and time.monotonic() - seen[0] < UNREACHABLE_FOR_S:
            code = seen[1]
        else:
            try:
                return await self._copy_server_side(h)
            except SourceUnreachableError as e:
                code = e.code
                self._unreachable[info.bucket] = (time.monotonic(), code)
                log.warning("server-side copy impossible, streaming", code=code)
        note = (
            f"server-side copy impossible (Azure answered {code}: it cannot reach "
            "the source); streamed through this host instead"
        )
        outcome = await self._fallback(h)
        outcome.note = f"{note}; {outcome.note}" if outcome.note else note
        return outcome

    async def _copy_server_side(self, h: Handoff) -> Outcome:
        """Put Block From URL for every block: Azure reads S3, this host reads nothing."""
        info, spec, progress = h.known, h.spec, h.progress
        dst = spec.destination
        cut = plan_blocks(info, self._settings.block_size, None, flavour="server-side")
        plan, done, cleared = await self.staged(
            cut, dst, lambda prefix: earlier_plan(prefix, cut, info, None, "server-side")
        )
        # An object in one block whose ETag is its MD5: Azure checks what it fetched.
        md5 = info.md5 if len(plan.blocks) == 1 else None
        if done:
            progress(sum(b.length for b in plan.blocks if b.index in done), reused=True)
        todo = [b for b in plan.blocks if b.index not in done]
        await _Staging(self, info, spec, plan, md5, progress).run(todo)
        if md5 is None and info.version_id is None:
            # Each block was fetched from whatever version S3 held then (no If-Match can
            # go with Azure's GETs; a versioned object's URLs name its version): an
            # object written over at the same size would commit as a mix of both.
            await self.still_the_same(info)
        ids = [plan.block_id(b.index, SERVER_SIDE_MD5) for b in plan.blocks]
        landing = await self.commit(info, h, ids, md5)
        verified = (
            SERVER_SIDE_CHECKED
            if md5
            else "size: server-side copy, the bytes went from S3 to Azure without passing here"
        )
        return Outcome(
            Status.COPIED,
            info.size,
            verified,
            cleared,
            landing=landing,
            blocks_reused=len(done),
            route=self.name,
        )

    def source_url(self, info: ObjectInfo) -> Awaitable[str]:
        return self._source_urls(info)


class _Staging:
    """The blocks of one object staged from URLs, block_concurrency at a time."""

    def __init__(
        self,
        route: ServerSide,
        info: ObjectInfo,
        spec: TransferSpec,
        plan: Plan,
        md5: bytes | None,
        progress: Progress,
    ) -> None:
        self._route = route
        self._info = info
        self._dst = spec.destination
        self._plan = plan
        self._md5 = md5
        self._progress = progress
        self._lanes = asyncio.Semaphore(route.settings.block_concurrency)

    async def run(self, todo: list[Block]) -> None:
        """Stage ``todo``; Interrupted when a drain stopped it (those in flight land)."""
        interrupted = False
        try:
            async with asyncio.TaskGroup() as tg:
                for n, block in enumerate(todo):
                    # A lane before a task exists: however many blocks, no more than
                    # block_concurrency tasks, and a drain lets those in flight land.
                    await self._lanes.acquire()
                    if self._route.stopping.is_set():
                        self._lanes.release()
                        interrupted = True
                        break
                    if n == 0:
                        await self._one(block)  # alone: if Azure cannot reach S3, none goes
                    else:
                        tg.create_task(self._one(block))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        if interrupted:
            raise Interrupted()  # the rest go on the next start

    async def _one(self, block: Block) -> None:
        try:
            what = f"stage {self._dst} block {block.index} from URL"
            await retrying(lambda: self._stage(block), self._route.settings.retry, what)
            self._progress(block.length)
        finally:
            self._lanes.release()

    async def _stage(self, block: Block) -> None:
        url = await self._route.source_url(self._info)  # fresh for every request
        block_id = self._plan.block_id(block.index, SERVER_SIDE_MD5)
        await self._route.sink.stage_from_url(
            self._dst, block_id, url, block.start, block.length, self._md5
        )
