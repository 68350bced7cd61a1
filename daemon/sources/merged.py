"""Two sources as one: the daemon's folder and its queue. Jobs are taken from whichever
has one first; each job goes back to the source it came from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import IO

from daemon.sources.base import ClaimedJob, Ending, JobSource, Spreader


class MergedSource:
    def __init__(self, *sources: JobSource) -> None:
        self._sources = sources
        self._owner: dict[str, JobSource] = {}  # job name -> its source

    def _of(self, job: ClaimedJob) -> JobSource:
        return self._owner[job.name]

    async def jobs(self, stop: asyncio.Event) -> AsyncGenerator[ClaimedJob, None]:
        streams = {s: s.jobs(stop) for s in self._sources}
        pending: dict[asyncio.Future[ClaimedJob], JobSource] = {}
        try:
            while not stop.is_set() and streams:
                for source, stream in streams.items():
                    if source not in pending.values():
                        pending[asyncio.ensure_future(anext(stream))] = source
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # One at a time, as the supervisor asks: the others stay claimed, and wait.
                first = min(done, key=lambda f: list(pending).index(f))
                source = pending.pop(first)
                try:
                    job = first.result()
                except StopAsyncIteration:
                    del streams[source]
                    continue
                self._owner[job.name] = source
                yield job
        finally:
            for future, source in pending.items():
                future.cancel()
                with contextlib.suppress(BaseException):
                    job = await future
                    await source.release(job)  # claimed, never handed on
            for stream in streams.values():
                await stream.aclose()

    async def cancel_requests(self, stop: asyncio.Event) -> AsyncGenerator[str, None]:
        queue: asyncio.Queue[str] = asyncio.Queue()

        async def pump(source: JobSource) -> None:
            async with contextlib.aclosing(source.cancel_requests(stop)) as names:
                async for name in names:
                    await queue.put(name)

        async with asyncio.TaskGroup() as tg:
            pumps = [tg.create_task(pump(s)) for s in self._sources]
            while not stop.is_set():
                getting = asyncio.ensure_future(queue.get())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if getting.done():
                    yield getting.result()
                else:
                    getting.cancel()
            for p in pumps:
                p.cancel()

    def claim(self, name: str) -> ClaimedJob | None:
        for source in self._sources:
            job = source.claim(name)
            if job is not None:
                self._owner[job.name] = source
                return job
        return None

    async def read(self, job: ClaimedJob) -> bytes:
        return await self._of(job).read(job)

    def spreader(self, job: ClaimedJob) -> Spreader | None:
        return self._of(job).spreader(job)

    async def finish(
        self, job: ClaimedJob, ending: Ending, write_report: Callable[[IO[str]], object]
    ) -> None:
        await self._owner.pop(job.name).finish(job, ending, write_report)

    async def release(self, job: ClaimedJob) -> None:
        await self._owner.pop(job.name).release(job)
