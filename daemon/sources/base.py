"""The seam between where jobs come from and the supervisor that runs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Protocol

from daemon.jobs import TransferSpec
from daemon.outcome import JobStatus


async def first_of(*aws: Awaitable[object], within: float) -> None:
    """Wait for the first of ``aws`` to finish, or ``within`` seconds; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this daemon owns until it calls ``finish`` (or dies: then ``jobs`` yields
    it again on the next start)."""

    name: str
    handle: object  # the source's own reference (a path, a queue receipt ...)
    recovered: bool = False  # claimed by an earlier run that did not finish it


@dataclass(frozen=True, slots=True)
class Ending:
    """How a job ended, as its source needs to know to hand it back."""

    status: JobStatus
    transient: bool = False  # failed only for reasons a later attempt may not meet
    poison: bool = False  # its text could not be read as a job at all


class Spreader(Protocol):
    """Where a large job's pages go, so that every instance works on them."""

    async def put(self, specs: list[TransferSpec], sizes: list[int]) -> None:
        """Send these objects (``sizes``: their bytes, 0 when not known) as pages."""
        ...


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
        self, job: ClaimedJob, ending: Ending, write_report: Callable[[IO[str]], object]
    ) -> None:
        """Hand the job back as it ended, with its report."""
        ...

    async def release(self, job: ClaimedJob) -> None:
        """Hand back a job that did not run to its end (a drain): it runs again later,
        here or elsewhere."""
        ...

    def spreader(self, job: ClaimedJob) -> Spreader | None:
        """Where ``job``'s prefixes go to be shared out as pages; None: run them here."""
        ...
