"""The whole route: an object of a block or less, held here between one GET and one
Put Blob, the two retried together so that bytes that arrive damaged are read again.

When S3 holds a value of the whole that Azure can check, the Put Blob carries it and
Azure checks the bytes against it: nothing is hashed here. That is the object's MD5
when its ETag is one, else S3's full-object CRC64NVME (blockcheck.whole_check).
Otherwise the MD5 is computed here for Azure's check, and the bytes are proven against
S3's ETag or checksum first: a small object is always verified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from daemon.addresses import S3Address
from daemon.blockcheck import BlockCheck, Kind, whole_check
from daemon.chunks import Chunks
from daemon.errors import CorruptBlockError, SourceChangedError, VerificationError
from daemon.objects import Listed, ObjectInfo
from daemon.outcome import Outcome, Status
from daemon.properties import Landing
from daemon.routes.base import Handoff, Route
from daemon.verify import Checksum, md5_off_loop, verify

Read = Callable[[], Awaitable[tuple[ObjectInfo, Chunks]]]
Sent = tuple[ObjectInfo, str, Landing]  # the version sent, how it is proven, its landing


class _Attempts:
    """One GET and one Put Blob per call; remembers what the last call sent and how
    many times the bytes arrived damaged."""

    def __init__(self, route: Whole, read: Read, h: Handoff) -> None:
        self._route = route
        self._read = read
        self._h = h
        self.sent: Sent | None = None
        self.damaged = 0

    async def __call__(self) -> Sent:
        info, data = await self._read()
        try:
            known = whole_check(info)
            if known is not None:
                check, verified = known
            else:
                md5 = await md5_off_loop(data)
                checksum = Checksum.for_object(info)
                if checksum is not None:
                    checksum.update(data)
                try:
                    verified = verify(info, md5, [md5] if info.parts == 1 else None, checksum)
                except VerificationError as e:
                    raise CorruptBlockError(str(e)) from None
                check = BlockCheck(Kind.MD5, md5)
            h = self._h
            landing = self._route.landing(info, h.spec, h.fp)
            self.sent = (info, verified, landing)
            await self._route.put(h, data, check, landing)
        except CorruptBlockError:
            self.damaged += 1
            raise
        return info, verified, landing


class Whole(Route):
    name = "whole"

    async def copy(self, h: Handoff) -> Outcome:
        """One GET (of the object a HEAD described, or of a listed one, whose GET
        stands in for the HEAD), one Put Blob."""
        if h.info is not None:
            return await self._copy(h.info.size, self._of_info(h.info), h)
        assert h.listed is not None, "a handoff names the object one way or the other"
        return await self._copy(h.listed.size, self._of_listed(h.listed, h.spec.source), h)

    async def _copy(self, size: int, read: Read, h: Handoff) -> Outcome:
        """Copy the object ``read`` returns (``size`` bytes, reserved in the budget)."""
        attempts = _Attempts(self, read, h)
        async with self._budget.hold(size):
            done = await self.write(attempts, f"copy {h.spec.source}", h, size)
        if done is None:  # an earlier attempt landed it; only its answer was lost
            assert attempts.sent is not None, "only a put is refused as existing"
            done = attempts.sent
        info, verified, landing = done
        h.progress(info.size)
        damaged = attempts.damaged
        note = (
            f"the bytes arrived damaged {damaged} time(s); read and sent again" if damaged else None
        )
        return Outcome(Status.COPIED, info.size, verified, note, landing=landing, route=self.name)

    async def put(self, h: Handoff, data: Chunks, check: BlockCheck, landing: Landing) -> None:
        await self._sink.put(
            h.spec.destination, data, check, landing.headers, landing.metadata, h.when, landing.tier
        )

    def _of_info(self, info: ObjectInfo) -> Read:
        """The read of an object a HEAD described: one ranged GET (none when empty)."""

        async def read() -> tuple[ObjectInfo, Chunks]:
            if not info.size:
                return info, Chunks()
            return info, await self._source.read_range(info, 0, info.size)

        return read

    def _of_listed(self, listed: Listed, src: S3Address) -> Read:
        """The read of a small listed object: one GET whose headers stand in for a HEAD.
        A listing says nothing of encryption; the GET's headers do, and when they show
        an ETag that cannot prove the bytes (SSE-KMS, SSE-C), S3's checksums are asked
        for with one HEAD, as ``Route.head`` does for a key."""

        async def read() -> tuple[ObjectInfo, Chunks]:
            info, data = await self._source.read_object(listed, src)
            if info.etag_is_md5 or not self._settings.verify:
                return info, data
            more = await self._source.head(src, True)
            if more.etag != info.etag:
                raise SourceChangedError(str(src))
            info = dataclasses.replace(
                info, checksums=more.checksums, checksum_type=more.checksum_type
            )
            return info, data

        return read
