"""A prefix, expanded into the objects under it: S3's listing a page at a time, the
job's include and exclude applied, what the destination already holds looked up in
its own listing (holdings.py), each page's largest objects first.

A transfer's number (its place in the report) follows key order, but a page's largest
objects start first, so a job never ends on one large object copying alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from daemon.holdings import Holdings, Known
from daemon.jobs import TransferSpec
from daemon.objects import Listed
from daemon.s3 import S3Reader


@dataclass(frozen=True, slots=True)
class Found:
    """One object under the prefix, numbered, with its own spec."""

    seq: int
    listed: Listed
    spec: TransferSpec
    known: Known | None  # what the destination's listing said of its blob


class Expansion:
    """The objects under ``spec``'s prefix, numbered from ``seq``. Counts what the
    filters left out, and whether a stop cut the listing short."""

    def __init__(self, spec: TransferSpec, seq: int) -> None:
        self.spec = spec
        self.start = self.seq = seq  # the next number to give
        self.excluded = 0
        self.interrupted = False

    async def pages(
        self, source: S3Reader, holdings: Holdings | None, first: int, stop: asyncio.Event
    ) -> AsyncIterator[list[Found]]:
        """A page of objects at a time, largest first. The first page holds ``first``
        keys (fills every slot at once); later pages arrive while earlier are copied.
        When ``stop`` is set, it ends: the rest is listed again on the next start."""
        spec = self.spec
        keys = spec.options.keys
        skip = len(spec.source.key)
        async with aclosing(source.pages(spec.source, first)) as listing:
            async for page in listing:
                if stop.is_set():
                    self.interrupted = True
                    return
                if keys is not None:
                    n = len(page)
                    page = [o for o in page if keys.admits(o.key[skip:])]
                    self.excluded += n - len(page)
                numbered = sorted(enumerate(page, self.seq), key=lambda n: -n[1].size)
                self.seq += len(page)
                specs = {o.key: spec.for_key(o.key) for o in page}
                known: dict[str, Known] = {}
                if holdings is not None:
                    known = await holdings.known(s.destination.blob for s in specs.values())
                yield [
                    Found(n, o, specs[o.key], known.get(specs[o.key].destination.blob))
                    for n, o in numbered
                ]

    def nothing_found(self) -> str | None:
        """Why the prefix gave no transfer, when it gave none."""
        if self.seq != self.start:
            return None
        if self.excluded:
            return (
                f"none of the {self.excluded} objects under {self.spec.source} is chosen "
                "by the job's include and exclude; check the patterns"
            )
        return f"no objects under {self.spec.source}; check the prefix"
