"""What a destination prefix already holds, listed in step with the S3 listing.

Under ``overwrite`` if-changed or never, a copy first asks whether its blob exists (and
holds which version): one HEAD per object. For a prefix of small objects that is a third
of the requests and, on a distant link, one of three round trips each object waits on.
A listing of the destination prefix (with metadata) answers the same for up to 5,000
blobs in one request, so the supervisor reads it page by page as it reads S3's, and
hands each object what the listing said about its blob.

Memory stays bounded by pages, never by the prefix: both listings come in name order,
so the Azure listing is read only as far as the S3 page in hand reaches, and entries
behind it are dropped. The listings agree on order for ASCII names (byte order, which
S3 documents; Azure lists "in alphabetical order, upper-case first"); a name with any
other character gets no answer, and its copy asks with a HEAD as before. So does every
object when the listing fails (no list permission, a missing container, a broken
connection): the answer is an optimisation, never a reason.

A listing can also cost more than the HEADs it saves: a few objects copied into a
prefix that already holds a million other blobs. So it may make three requests, and
one more for each hundred names it has answered for; past that it stops, and the copies
ask.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import structlog

from daemon.seams import ExistingBlob

log = structlog.get_logger("blobferry")


@dataclass(frozen=True, slots=True)
class Known:
    """What the listing said of one blob: ``blob`` None means it does not exist."""

    blob: ExistingBlob | None


class Holdings:
    """A cursor over the destination's listing, advanced by the S3 pages' names."""

    def __init__(self, pages: AsyncIterator[list[tuple[str, ExistingBlob]]]) -> None:
        self._pages: AsyncIterator[list[tuple[str, ExistingBlob]]] | None = pages
        self._ahead: deque[tuple[str, ExistingBlob]] = deque()
        self._reached = ""  # every ASCII name up to this one has been listed
        self._ended = False  # the listing is complete
        self._requests = 0
        self._answered = 0

    async def known(self, names: Iterable[str]) -> dict[str, Known]:
        """What the listing says of each of ``names`` (a page's destination names);
        a name left out has no answer. Names must not fall behind earlier calls'."""
        wanted = [n for n in names if n.isascii()]
        if not wanted or self._pages is None:
            return {}
        last = max(wanted)
        while not self._ended and self._reached < last:
            if self._requests >= 3 + self._answered // 100:
                log.info("destination listing costs more than it saves; each copy asks")
                await self.aclose()
                return {}
            self._requests += 1
            if not await self._next_page():
                return {}  # the listing failed: no answers from now on
        listed: dict[str, ExistingBlob] = {}
        while self._ahead and self._ahead[0][0] <= last:
            name, blob = self._ahead.popleft()
            listed[name] = blob
        self._answered += len(wanted)
        return {n: Known(listed.get(n)) for n in wanted}

    async def _next_page(self) -> bool:
        assert self._pages is not None
        try:
            page = await anext(self._pages)
        except StopAsyncIteration:
            self._ended = True
            return True
        except Exception as e:  # anything: the copies ask for themselves instead
            log.info("destination not listed; each copy asks for its blob", reason=str(e))
            await self.aclose()
            return False
        # Only ASCII names are answered for, and among themselves both sides order them
        # alike: the rest are not kept, so they cannot stand between two that are.
        mine = [entry for entry in page if entry[0].isascii()]
        self._ahead.extend(mine)
        if mine:
            self._reached = max(self._reached, mine[-1][0])
        return True

    async def aclose(self) -> None:
        pages, self._pages = self._pages, None
        self._ahead.clear()
        close = getattr(pages, "aclose", None)
        if close is not None:
            await close()
