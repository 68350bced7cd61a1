"""The seam between where jobs come from and the supervisor that runs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import IO, Protocol


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this daemon owns until it calls ``finish`` (or dies: then ``jobs`` yields
    it again on the next start)."""

    name: str
    handle: object  # the source's own reference (a path, a queue receipt ...)
    recovered: bool = False  # claimed by an earlier run that did not finish it


class JobSource(Protocol):
    def jobs(self, stop: asyncio.Event) -> AsyncGenerator[ClaimedJob, None]:
        """Claim jobs one at a time, as the caller asks for them; end when ``stop`` is set.
        Jobs an earlier run claimed and did not finish come first."""
        ...

    def cancel_requests(self, stop: asyncio.Event) -> AsyncGenerator[str, None]:
        """The names of jobs someone asked to stop, each once; ends when ``stop`` is set."""
        ...

    def claim(self, name: str) -> ClaimedJob | None:
        """Claim the waiting job ``name`` out of its turn (to file it unrun), or None if
        no such job waits."""
        ...

    async def read(self, job: ClaimedJob) -> bytes:
        """The job's text; raises JobFileError if it cannot be a job."""
        ...

    async def finish(
        self, job: ClaimedJob, ok: bool, write_report: Callable[[IO[str]], object]
    ) -> None:
        """Hand the job back as done (``ok``) or failed, with its report."""
        ...
