"""The pipe route: on a near link, one GET streamed into one Put Blob as it arrives.

Only for an object S3 holds a whole-object check of that Azure takes too: the MD5 of a
single-part object (its ETag), or else a full-object CRC64NVME (which S3 keeps of every
object uploaded without a checksum of its own since December 2024, multipart ones
included). Azure checks every byte of the stream against it and keeps nothing
otherwise, so nothing is hashed here. Farther away, parallel blocks are faster; and a
block can resume, where a pipe starts again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from daemon.blockcheck import BlockCheck, whole_check
from daemon.errors import CorruptBlockError, NotPermittedError, TransferError
from daemon.jobs import TransferSpec
from daemon.latency import FAR_AFTER, RoundTrips
from daemon.objects import ObjectInfo
from daemon.outcome import Outcome, Progress, Status
from daemon.properties import Landing
from daemon.routes.base import Handoff, Route
from daemon.settings import MiB

PIPE_BUFFER = MiB  # the stream's own buffers (aiohttp's, a few hundred KiB), budgeted


async def near(trips: RoundTrips, probe: Callable[[], Awaitable[object]], within: float) -> bool:
    """Whether a service answers within ``within`` s, asking ``probe`` (a HEAD) until
    its round trips tell: one late answer may be a busy moment, not a far link."""
    for _ in range(FAR_AFTER + 1):  # the client's first answer may be among them
        verdict = trips.near(within)
        if verdict is not None:
            return verdict
        try:
            await probe()
        except NotPermittedError:
            pass  # refused, but answered: the round trip is timed all the same
        except TransferError:
            return False  # the block path reports the problem properly
    return trips.near(within) is True


class _Attempts:
    """One GET piped into one Put Blob per call; counts the times Azure found the
    bytes damaged. A failed attempt takes its bytes back from the progress."""

    def __init__(
        self,
        route: Pipe,
        info: ObjectInfo,
        check: BlockCheck,
        h: Handoff,
        landing: Landing,
        progress: Progress,
    ) -> None:
        self._route = route
        self._info = info
        self._check = check
        self._h = h
        self._landing = landing
        self._progress = progress
        self.damaged = 0
        self._sent = 0  # of this attempt
        self._source_error: Exception | None = None

    async def __call__(self) -> bool:
        info, landing = self._info, self._landing
        self._sent = 0
        # What went wrong on the S3 side while Azure was reading the body: aiohttp
        # reports it as a failed upload, this says what it was.
        self._source_error = None
        try:
            async with self._route.source.open_object(info) as chunks:
                await self._route.sink.put_stream(
                    self._h.spec.destination,
                    self._body(chunks),
                    info.size,
                    self._check,
                    landing.headers,
                    landing.metadata,
                    self._h.when,
                    landing.tier,
                )
            return True
        except BaseException as e:
            self._progress(-self._sent)  # nothing landed: a next try starts from byte 0
            if not isinstance(e, TransferError):
                raise  # cancelled (a drain that ran out of time), or a bug
            if isinstance(e, CorruptBlockError):
                self.damaged += 1
            raise (self._source_error or e) from None

    async def _body(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The object's chunks as Azure takes them, counted as they go."""
        try:
            async for chunk in chunks:
                self._sent += len(chunk)
                self._progress(len(chunk))
                yield chunk
        except Exception as e:
            self._source_error = e
            raise


class Pipe(Route):
    name = "pipe"

    async def wanted(self, info: ObjectInfo, spec: TransferSpec) -> bool:
        """Whether ``info`` goes by this route: an object Azure can check whole against
        S3's own value (``whole_check``), larger than a block and within pipe_max, and
        both services near enough that one stream runs at full speed."""
        s = self._settings
        if not (
            s.block_size < info.size <= s.pipe_max
            and whole_check(info) is not None
            and (spec.options.mode or s.mode) == "stream"
            and self._sink.streams
        ):
            return False
        within = s.pipe_rtt_ms / 1000
        # The HEAD just made is among S3's round trips; Azure's are timed on HEADs of the
        # destination, once a minute at most while objects keep coming.
        source, sink = self._source, self._sink
        return await near(
            source.round_trips, lambda: source.head(info.address), within
        ) and await near(sink.round_trips, lambda: sink.existing(spec.destination), within)

    async def copy(self, h: Handoff) -> Outcome:
        info, spec, fp, progress = h.known, h.spec, h.fp, h.progress
        landing = self.landing(info, spec, fp)
        dst = spec.destination
        known = whole_check(info)
        assert known is not None, "Pipe.wanted chose this route for such an object only"
        check, verified = known
        attempts = _Attempts(self, info, check, h, landing, progress)
        async with self._budget.hold(PIPE_BUFFER):
            what = f"pipe {info.address} to {dst}"
            if await self.write(attempts, what, h, info.size) is None:
                progress(info.size)  # an earlier attempt landed it; only its answer was lost
        damaged = attempts.damaged
        note = f"Azure found the bytes damaged {damaged} time(s); sent again" if damaged else None
        return Outcome(Status.COPIED, info.size, verified, note, landing=landing, route=self.name)
