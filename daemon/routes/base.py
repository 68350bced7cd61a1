"""What the routes share: the two sides, the byte budget, and the steps every route
takes the same way (a HEAD, a write retried, a commit, the blocks a resume finds).

A route is one way of moving an object's bytes (routes/whole.py, pipe.py, blocks.py,
server_side.py); the Copier (transfer.py) chooses one per object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from daemon.addresses import AzAddress, S3Address
from daemon.budget import Budget
from daemon.errors import (
    BlobChangedError,
    DestinationExistsError,
    NotPermittedError,
    PermanentError,
    RetryableError,
    SourceChangedError,
    TransferError,
)
from daemon.jobs import Overwrite, TransferSpec
from daemon.layout import Plan, foreign_blocks, resume_point
from daemon.objects import Listed, ObjectInfo
from daemon.outcome import Outcome, Progress
from daemon.properties import FINGERPRINT_KEY, Landing, landing
from daemon.retry import retrying
from daemon.seams import ANYTHING, BlobSink, ExistingBlob, ObjectSource, Precondition
from daemon.settings import MiB, Settings

T = TypeVar("T")
log = structlog.get_logger("blobferry.transfer")


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the Copier hands a route: the transfer, the version it is to copy, and
    where its progress goes."""

    spec: TransferSpec
    fp: str  # the source version's fingerprint (properties.fingerprint)
    progress: Progress
    info: ObjectInfo | None = None  # what a HEAD said; None: ``listed``, read whole
    listed: Listed | None = None
    # What the blob must still be when the copy lands: as it was looked at, before S3
    # was asked which version to copy (transfer.py says why that order).
    when: Precondition = ANYTHING

    @property
    def known(self) -> ObjectInfo:
        """The HEAD's answer, which every route but whole's listed object starts from."""
        assert self.info is not None, "this route starts from a HEAD"
        return self.info


class Route:
    """A way of moving an object's bytes, and the steps all of them share."""

    name: str = ""

    async def copy(self, h: Handoff) -> Outcome:
        """Move the object's bytes, commit the blob, and say how (an Outcome)."""
        raise NotImplementedError

    def __init__(
        self,
        settings: Settings,
        source: ObjectSource,
        sink: BlobSink,
        budget: Budget,
        stopping: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        self._budget = budget
        # Set when the daemon drains: no new transfer and no new block starts.
        self._stopping = stopping

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def source(self) -> ObjectSource:
        return self._source

    @property
    def sink(self) -> BlobSink:
        return self._sink

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    async def head(self, src: S3Address) -> ObjectInfo:
        policy = self._settings.retry
        # S3's additional checksums too: where the ETag cannot prove the copy they are
        # the proof, and where it can, a CRC among them is the cheaper one (verify.py).
        checksums = self._settings.verify
        info = await retrying(lambda: self._source.head(src, checksums), policy, f"HEAD {src}")
        info.raise_if_unreadable()
        return info

    def landing(self, info: ObjectInfo, spec: TransferSpec, fp: str) -> Landing:
        return landing(info, spec, fp, self._settings.azure.tiers)

    async def still_the_same(self, info: ObjectInfo) -> None:
        """SourceChangedError unless S3 still holds the version ``info`` describes."""
        src = info.address
        now = await retrying(lambda: self._source.head(src), self._settings.retry, f"HEAD {src}")
        if (now.etag, now.size) != (info.etag, info.size):
            raise SourceChangedError(str(info.address))

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        return await retrying(
            lambda: self._sink.existing(dst), self._settings.retry, f"check {dst}"
        )

    async def write(
        self, once: Callable[[], Awaitable[T]], what: str, h: Handoff, size: int
    ) -> T | None:
        """``once`` retried; None when its precondition was refused because an earlier
        attempt had landed this very copy and only its answer was lost. A refusal that
        is not that raises BlobChangedError (the Copier looks again) or, under
        'never', DestinationExistsError."""
        dst = h.spec.destination
        try:
            return await retrying(once, self._settings.retry, what)
        except (DestinationExistsError, BlobChangedError):
            if await self._ours_already(dst, h.fp, size):
                return None
            if h.spec.overwrite is Overwrite.NEVER:
                raise
            raise BlobChangedError(dst) from None

    async def _ours_already(self, dst: AzAddress, fp: str, size: int) -> bool:
        """After a conditional write was refused: whether the blob there is this very
        copy, committed by an earlier attempt whose answer was lost (a reset after Azure
        had done the work), so the retry found it in the way."""
        existing = await self.existing(dst)
        if existing is None or existing.size != size:
            return False
        if existing.metadata.get(FINGERPRINT_KEY) != fp:
            return False
        log.warning("the blob had landed already: an attempt's answer was lost")
        return True

    async def commit(
        self, info: ObjectInfo, h: Handoff, ids: list[str], md5: bytes | None
    ) -> Landing:
        """Commit the block list with the source's properties, on the handoff's
        precondition; returns how it landed."""
        landing = self.landing(info, h.spec, h.fp)
        dst = h.spec.destination
        await self.write(
            lambda: self._sink.commit(
                dst, ids, md5, landing.headers, landing.metadata, h.when, landing.tier
            ),
            f"commit {dst}",
            h,
            info.size,
        )
        return landing

    async def staged(
        self, plan: Plan, dst: AzAddress, earlier: Callable[[str], Plan | None]
    ) -> tuple[Plan, dict[int, bytes], str | None]:
        """The plan to go on with and its blocks already on the destination, from
        Azure's own record (see ``layout.resume_point``), and a note when blocks another
        writer left had to be discarded first, or an earlier run's layout was taken up."""
        policy = self._settings.retry
        try:
            staged = await retrying(lambda: self._sink.staged_blocks(dst), policy, f"blocks {dst}")
        except NotPermittedError:
            # A write-only SAS (create and write: the least an upload needs) may not
            # list blocks. The transfer goes on, staging every block; it cannot resume.
            log.warning("no permission to list staged blocks: every block is sent")
            return plan, {}, None
        # Azure takes block IDs of one length per blob: an upload another tool left
        # unfinished (its IDs of another length) refuses every block of ours as
        # InvalidBlobOrBlock for the 7 days its blocks live.
        foreign = foreign_blocks(staged)
        if foreign:
            if await self.existing(dst):
                raise PermanentError(
                    f"{dst}: {foreign} uncommitted block(s) another tool left on this blob "
                    "have IDs of another length, and Azure takes no block of ours beside "
                    "them; they go when that tool commits or 7 days after its last block; "
                    "or copy to another name"
                )
            # Nothing is committed: deleting the blob deletes only those blocks.
            await retrying(lambda: self._sink.discard_uncommitted(dst), policy, f"clear {dst}")
            log.warning("discarded uncommitted blocks another tool left", blocks=foreign)
            cleared = f"discarded {foreign} uncommitted block(s) another tool had left on the blob"
            return plan, {}, cleared
        chosen, held, note = resume_point(plan, staged, earlier)
        if chosen is not plan:
            log.info(
                "resuming in an earlier run's layout",
                block_mib=chosen.block_size // MiB,
                blocks_held=len(held),
            )
        return chosen, held, note


def first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that sank a group of block tasks; the rest were cancelled because of it."""
    errors = [e for e in _leaves(eg) if not isinstance(e, asyncio.CancelledError)]
    for kind in (PermanentError, TransferError, RetryableError):
        for e in errors:
            if isinstance(e, kind):
                return e
    return errors[0] if errors else asyncio.CancelledError()


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]
