"""Where a copy is decided: one object, S3 to Azure, by the route that suits it.

The Copier asks what it must before moving a byte (is the blob already this version?
is it a dry run?) and hands the object to a route (routes/): whole (a block or less,
held here for one Put Blob), pipe (on a near link, one GET streamed into one Put Blob
that Azure checks against S3's MD5 ETag), blocks (cut, read, staged many at once,
verified, committed; resumable) or server-side (Azure fetches the blocks itself). It
returns an Outcome. Nothing here knows where a job came from or writes to local disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from daemon.addresses import AzAddress, S3Address, blob_name_problem
from daemon.budget import Budget
from daemon.errors import (
    BlobChangedError,
    ContainerMissingError,
    Interrupted,
    NotPermittedError,
    ObjectMissingError,
    PermanentError,
)
from daemon.holdings import Holdings, Known
from daemon.jobs import Overwrite, TransferSpec
from daemon.objects import ARCHIVE_CLASSES, ArchivedObjectError, Listed, ObjectInfo
from daemon.outcome import DRY_RUN, Outcome, Progress, Status, unwatched
from daemon.properties import ETAG_KEY, FINGERPRINT_KEY, fingerprint
from daemon.retry import retrying
from daemon.routes import Blocks, Handoff, Pipe, Route, ServerSide, SourceUrls, Whole
from daemon.seams import ANYTHING, BlobId, BlobSink, ObjectSource, Precondition
from daemon.settings import Settings

log = structlog.get_logger("blobferry.transfer")

# Looks at the blob and the object per copy when another writer keeps committing the
# blob under it; past this, the copy fails as transient (a queue's job is released).
LOOKS = 3


class Copier:
    """Copies one object at a time per call; many calls run concurrently, sharing the
    byte budget and both sides' connection pools."""

    def __init__(
        self,
        settings: Settings,
        source: ObjectSource,
        sink: BlobSink,
        budget: Budget,
        stopping: asyncio.Event | None = None,
        source_urls: SourceUrls | None = None,
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        # Set when the daemon drains: no new transfer and no new block starts.
        self._stopping = stopping or asyncio.Event()
        sides = (settings, source, sink, budget, self._stopping)
        self._steps = Route(*sides)  # what every route does alike: a HEAD, a blob's state
        self._whole = Whole(*sides)
        self._pipe = Pipe(*sides)
        self._blocks = Blocks(*sides)
        self._server_side = ServerSide(*sides, fallback=self._streamed, source_urls=source_urls)

    def identify(self, dst: AzAddress) -> BlobId:
        """The blob a destination names, however it is spelled (one writer per blob)."""
        return self._sink.identify(dst)

    async def holdings(self, spec: TransferSpec) -> Holdings | None:
        """For a prefix whose copies would each ask whether their blob exists: the
        destination's listing, to tell them instead (see holdings.py). Its container
        is created first, where that is asked for, so it can be listed."""
        await self._container(spec)
        if spec.overwrite is Overwrite.ALWAYS or not spec.source.is_prefix:
            return None
        return Holdings(self._sink.listing(spec.destination, 1000))

    async def copy(
        self,
        spec: TransferSpec,
        listed: Listed | None = None,
        progress: Progress | None = None,
        known: Known | None = None,
        sized: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Copy ``spec`` (one object). Raises TransferError when it cannot. ``known``:
        what the destination's listing said of its blob, if it said anything; ``sized``
        is told the object's size when a HEAD tells it (an object no listing sized)."""
        if self._stopping.is_set():
            raise Interrupted()
        try:
            await self._container(spec)
            for attempt in range(1, LOOKS + 1):
                try:
                    return await self._copy(spec, listed, progress or unwatched, known, sized)
                except BlobChangedError:
                    if attempt == LOOKS:
                        raise
                    # Another writer (a daemon sharing the queue) committed the blob while
                    # this copy ran: look again at both sides, which may now skip it.
                    log.info("the blob changed under the copy, looking again")
                    listed = known = None
            raise AssertionError("unreachable")
        except ArchivedObjectError as e:
            if self._settings.archived == "skip":
                return Outcome(Status.SKIPPED, note=str(e))
            raise
        except ContainerMissingError:
            if not self._settings.azure.create_containers:
                raise
            # Deleted while the daemon ran: this transfer fails, the next creates it.
            self._sink.forget_container(spec.destination)
            raise PermanentError(
                f"{spec.destination}: container {spec.destination.container!r} was deleted "
                "during the copy; the next transfer into it creates it again"
            ) from None

    async def _container(self, spec: TransferSpec) -> None:
        """Create the destination's container if asked to (azure.create_containers),
        once per run; a dry run creates nothing."""
        if self._settings.azure.create_containers and not spec.options.dry_run:
            dst = spec.destination
            await retrying(
                lambda: self._sink.ensure_container(dst),
                self._settings.retry,
                f"create container {dst.container!r}",
            )

    async def _copy(
        self,
        spec: TransferSpec,
        listed: Listed | None,
        progress: Progress,
        known: Known | None,
        sized: Callable[[int], None] | None,
    ) -> Outcome:
        src = spec.source
        # A job's own addresses were checked when it was read; a prefix's children get
        # their names from S3 keys, which allow what blob names do not.
        problem = blob_name_problem(spec.destination.blob)
        if problem:
            raise PermanentError(f"{spec.destination}: {problem}")
        bs = self._settings.block_size
        # The blob is looked at before S3 is asked which version to copy, and the copy
        # lands only on the blob as looked at (a Precondition). S3 reads after writes,
        # so any version committed before the look is no newer than the one copied,
        # and any committed after it refuses the commit: however many daemons copy one
        # key at once, a blob never goes back to an older version.
        # A large object asks Azure itself (the listing's word may be old by now): that
        # HEAD is also what times Azure for the pipe decision, and costs nothing beside
        # its bytes.
        if listed is None or listed.size > bs:
            known = None
        looked = await self._look(spec, known)
        info: ObjectInfo | None = None
        if listed is None:
            try:
                info = await self._steps.head(src)
            except ObjectMissingError:
                if not spec.options.delete:
                    raise
                return await self._gone(spec, looked)
            fp = fingerprint(src, info.etag, info.size)
            if sized is not None:
                sized(info.size)
        else:
            # A listing gives ETag and size: enough to skip an unchanged object without
            # a single request to S3 for it.
            fp = fingerprint(src, listed.etag, listed.size)
        skip = self._skip_reason(spec, fp, looked)
        if skip:
            return Outcome(Status.SKIPPED, note=skip)
        if spec.options.dry_run:
            return await self._dry_run(src, info, listed)
        # Server-side, even a small object goes as a block Azure fetches itself: its
        # properties come from a HEAD, as no GET passes through here.
        server_side = (spec.options.mode or self._settings.mode) == "server-side"
        if listed is not None and (listed.size > bs or (server_side and listed.size)):
            info = await self._steps.head(src)
            fp = fingerprint(src, info.etag, info.size)  # the version actually copied
        when = ANYTHING if looked is None else Precondition.of(looked.blob)
        h = Handoff(spec, fp, progress, info, listed, when)
        if info is None:  # a small listed object: one GET, whose headers stand in for a HEAD
            return await self._whole.copy(h)
        if server_side and info.size:
            return await self._server_side.copy(h)
        if await self._pipe.wanted(info, spec):
            return await self._pipe.copy(h)
        return await self._streamed(h)

    async def _streamed(self, h: Handoff) -> Outcome:
        """Through this host: a small object in one GET and one Put Blob, a larger one
        as blocks."""
        if h.known.size > self._settings.block_size:
            return await self._blocks.copy(h)
        return await self._whole.copy(h)

    async def _dry_run(
        self, src: S3Address, info: ObjectInfo | None, listed: Listed | None
    ) -> Outcome:
        """What a copy would do, having asked what it asks before reading a byte: the
        destination (skipped as unchanged, or refused by overwrite 'never', above) and,
        for one object, or one in an archive class whose listing cannot say if it is
        restored, the source's HEAD (missing, denied or archived fail, or skip, as a
        copy would)."""
        if info is None:
            assert listed is not None
            if listed.storage_class not in ARCHIVE_CLASSES:
                return Outcome(Status.SKIPPED, note=DRY_RUN, would_copy=listed.size)
            info = await self._steps.head(src)
        return Outcome(Status.SKIPPED, note=DRY_RUN, would_copy=info.size)

    async def _look(self, spec: TransferSpec, known: Known | None) -> Known | None:
        """What the destination holds (``known``, when a listing said), or None when the
        transfer does not ask (overwrite 'always': the last writer wins)."""
        if spec.overwrite is Overwrite.ALWAYS and not spec.options.delete:
            return None
        if known is not None:
            return known
        dst = spec.destination
        try:
            return Known(await self._steps.existing(dst))
        except NotPermittedError:
            raise PermanentError(
                f"{dst}: overwrite '{spec.overwrite}' reads the blob first, and the "
                "credentials may not read (AuthorizationPermissionMismatch): grant read, "
                "or set overwrite 'always'"
            ) from None
        except ContainerMissingError:
            if not (spec.options.dry_run and self._settings.azure.create_containers):
                raise
            return Known(None)  # a copy would create the container: no blob is there

    async def _gone(self, spec: TransferSpec, looked: Known | None) -> Outcome:
        """delete, and S3 holds no object under the key: its blob goes, if blobferry
        copied it from this very key (its fingerprint names this key with the ETag and
        size it records) and it is still the blob looked at before S3 was asked."""
        blob = looked.blob if looked is not None else None
        if blob is None:
            return Outcome(Status.SKIPPED, note="gone from S3, and no blob is there")
        etag = blob.metadata.get(ETAG_KEY)
        ours = etag is not None and blob.metadata.get(FINGERPRINT_KEY) == fingerprint(
            spec.source, etag, blob.size
        )
        if not ours:
            return Outcome(
                Status.SKIPPED,
                note="gone from S3; the blob there was not copied from it by blobferry, "
                "so it stays",
            )
        if spec.options.dry_run:
            return Outcome(Status.SKIPPED, note="dry run: would be deleted (gone from S3)")
        dst = spec.destination
        await retrying(
            lambda: self._sink.delete(dst, Precondition.of(blob)),
            self._settings.retry,
            f"delete {dst}",
        )
        return Outcome(Status.DELETED, note="gone from S3: the blob copied from it deleted")

    def _skip_reason(self, spec: TransferSpec, fp: str, looked: Known | None) -> str | None:
        existing = looked.blob if looked is not None else None
        if existing is None:
            return None
        if spec.overwrite is Overwrite.NEVER:
            return "destination exists and overwrite is 'never'"
        if existing.metadata.get(FINGERPRINT_KEY) == fp:
            return "unchanged: the blob already holds this version of the object"
        return None
