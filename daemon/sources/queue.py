"""Jobs as messages on an SQS queue, shared by every daemon that reads it.

A message is received only when a transfer slot is free (the supervisor asks for a job
then), with long polling, as many as there are free slots. While its job runs it is
kept hidden from the fleet: every third of ``visibility_s`` its visibility is renewed,
so a daemon killed mid-job frees it within ``visibility_s``, and another daemon resumes
the object from the blocks Azure holds. It is deleted only once its report is written
(results.py). A job that failed for good is reported and deleted; one that failed for
a passing reason is released for redelivery after a delay; a message that is no job at
all is released at once, and the queue's redrive policy takes it to the dead-letter
queue after maxReceiveCount receives. On a drain, what did not finish is released at
once: no message stays hidden longer than it takes to say so.

A job's name is ``sqs-<message ID>``: the same on every delivery of the message, so a
redelivery resumes under the same record, and its report replaces the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import IO

import structlog

from daemon.errors import JobFileError, TransferError
from daemon.events import Job, NotAJob, Nothing, decode
from daemon.jobs import TransferSpec
from daemon.metrics import Metrics
from daemon.outcome import JobStatus
from daemon.results import Results
from daemon.routing import Routes
from daemon.service_settings import SqsSettings
from daemon.sources.base import ClaimedJob, Ending, first_of
from daemon.sqs import Message, Queue

log = structlog.get_logger("blobferry.queue")

MAX_DELAY_S = 900  # SQS's longest message delay; a released job's is capped at it too
PAGE_BYTES = 200_000  # a page's job text, within SQS's 256 KiB a message


class QueueSource:
    def __init__(
        self,
        settings: SqsSettings,
        queue: Queue,
        results: Results,
        routes: Routes,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._results = results
        self._routes = routes
        self._metrics = metrics
        self._held: dict[str, Message] = {}  # job name -> its message, kept hidden
        self._jobs: dict[str, Job | NotAJob] = {}  # job name -> what its message says
        self._max_receives: int | None = None
        # Objects a job has named lately (a moving average): a receive asks for as
        # many jobs as fill the free slots, not one job a slot. A page of 1,000 keys
        # fills them alone; taking ten would hold nine back from the rest of the fleet.
        # Until a job has been seen, one is asked for: the first few events cost a
        # receive each, and then they come ten at a time.
        self._per_job: float | None = None
        self._heartbeat: asyncio.Task[None]
        # Free transfer slots (the supervisor's); 0 while this daemon could not start
        # another job's bytes any sooner (at its bandwidth cap): others take it then.
        self.room: Callable[[], int] = lambda: 1

    async def __aenter__(self) -> QueueSource:
        """The queue reached, its redrive policy read, and the heartbeat started: it
        keeps the messages of running jobs hidden until the source closes, after the
        supervisor has drained."""
        await self._prepare()
        self._heartbeat = asyncio.create_task(self._keep_hidden(), name="queue-heartbeat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeat
        # Jobs cancelled past the grace period never said how they ended: theirs go
        # back now, not when their visibility lapses.
        for name in list(self._held):
            await self.release(ClaimedJob(name, self._held[name].id))

    async def _prepare(self) -> None:
        self._max_receives = await self._queue.max_receives()
        if self._max_receives is None:
            log.warning(
                "the queue has no dead-letter queue (no redrive policy): a message that "
                "is no job comes back for ever; give the queue one",
                queue=self._queue.url,
            )

    # -- taking jobs ----------------------------------------------------------------

    async def jobs(self, stop: asyncio.Event) -> AsyncGenerator[ClaimedJob, None]:
        waiting: deque[ClaimedJob] = deque()
        try:
            while not stop.is_set():
                if waiting:
                    yield waiting.popleft()
                    continue
                messages = await self._receive(stop)
                for m in messages:
                    job = await self._take(m)
                    if job is not None:
                        waiting.append(job)
        finally:
            for job in waiting:  # received, never run: back to the fleet at once
                await self.release(job)

    async def _receive(self, stop: asyncio.Event) -> list[Message]:
        s = self._settings
        room = self.room()
        if not room:
            await first_of(stop.wait(), within=0.2)
            return []
        most = max(1, int(room // max(1.0, self._per_job or room)))
        receiving = asyncio.ensure_future(self._queue.receive(most, s.wait_s, s.visibility_s))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not receiving.done():
                receiving.cancel()  # a drain does not wait out a long poll
                await asyncio.wait({receiving})
        if receiving.cancelled():
            return []
        try:
            messages = receiving.result()
        except TransferError as e:  # the queue unreachable, past every retry
            log.error("cannot receive from the queue", error=str(e))
            await first_of(stop.wait(), within=s.retry_delay_s or 1)
            return []
        now = time.time()
        self._metrics.messages["received"] += len(messages)
        self._metrics.queue_lag_s = max((now - m.sent_at for m in messages), default=0.0)
        return messages

    async def _take(self, m: Message) -> ClaimedJob | None:
        """A received message as a job; None when it asks for nothing (then deleted)."""
        name = f"sqs-{m.id}"
        if name in self._held:
            # Delivered again while its job still runs here (its visibility lapsed): the
            # newest receipt is the one SQS honours now.
            self._held[name] = m
            return None
        try:
            said: Job | Nothing | NotAJob = decode(m.body, self._routes)
        except NotAJob as e:
            said = e
        if isinstance(said, Nothing):
            log.info("message asks for nothing, deleted", message=m.id, reason=said.reason)
            await self._delete(m)
            self._metrics.messages["ignored"] += 1
            return None
        self._held[name] = m
        self._jobs[name] = said
        if isinstance(said, Job):  # a prefix fills every slot as it is expanded
            objects = said.objects if said.objects is not None else self.room()
            self._per_job = (self._per_job or objects) / 2 + objects / 2
        return ClaimedJob(name, m.id, recovered=m.receives > 1)

    async def _keep_hidden(self) -> None:
        """Renew every held message's visibility each third of it."""
        every = self._settings.visibility_s / 3
        while True:
            await asyncio.sleep(every)
            held = dict(self._held)
            if not held:
                continue
            try:
                lost = await self._queue.hide(list(held.values()), self._settings.visibility_s)
            except TransferError as e:
                log.warning("could not keep messages hidden", error=str(e), messages=len(held))
                continue
            for m in lost:
                log.warning(
                    "a message went back to the queue while its job ran here; another "
                    "daemon may take it too, which the conditional commit makes harmless",
                    message=m.id,
                )

    def cancel_requests(self, stop: asyncio.Event) -> AsyncGenerator[str, None]:
        return _none(stop)  # a queue's jobs are cancelled by deleting their messages

    def claim(self, name: str) -> ClaimedJob | None:
        return None

    # -- reading and handing back ---------------------------------------------------

    async def read(self, job: ClaimedJob) -> bytes:
        said = self._jobs[job.name]
        if isinstance(said, NotAJob):
            raise JobFileError(f"queue message {job.handle}: {said}")
        for note in said.skipped:
            log.info("left out of the job", job=job.name, reason=note)
        return said.text.encode()

    def spreader(self, job: ClaimedJob) -> Pages:
        s = self._settings
        return Pages(self._queue, job.name, s.page_keys, s.page_mb << 20)

    async def finish(
        self, job: ClaimedJob, ending: Ending, write_report: Callable[[IO[str]], object]
    ) -> None:
        m = self._held.get(job.name)
        if m is None:
            return
        try:
            where = await self._results.write(job.name, m.parent, write_report)
        except Exception as e:  # the report is what deleting waits for: try again later
            log.error("report not written, the message goes back", job=job.name, error=str(e))
            await self._hand_back(job, delay_s=self._delay(m))
            return
        if ending.poison:
            last = self._max_receives is not None and m.receives >= self._max_receives
            log.error(
                "message is no job, released: "
                + ("the dead-letter queue takes it next" if last else "it comes back"),
                job=job.name,
                receives=m.receives,
                report=where,
            )
            # Without a dead-letter queue it would come straight back for ever: slowly.
            delay = 0 if self._max_receives is not None else self._delay(m)
            await self._hand_back(job, delay_s=delay, event="dead_lettered" if last else None)
        elif ending.status is JobStatus.FAILED and ending.transient:
            delay = self._delay(m)
            log.warning("job failed for a passing reason, released", job=job.name, delay_s=delay)
            await self._hand_back(job, delay_s=delay)
        else:
            await self._delete(m)
            self._forget(job.name)
            log.info("message deleted, its report written", job=job.name, report=where)

    def _delay(self, m: Message) -> int:
        base = self._settings.retry_delay_s
        return int(min(MAX_DELAY_S, base * 2 ** min(m.receives - 1, 10)))

    async def release(self, job: ClaimedJob) -> None:
        await self._hand_back(job, delay_s=0)

    async def _hand_back(self, job: ClaimedJob, delay_s: int, event: str | None = None) -> None:
        m = self._held.get(job.name)
        self._forget(job.name)
        if m is None:
            return
        try:
            await self._queue.release(m, delay_s)
        except TransferError as e:  # it comes back when its visibility lapses all the same
            log.warning("could not release a message", job=job.name, error=str(e))
        self._metrics.messages[event or "released"] += 1

    async def _delete(self, m: Message) -> None:
        try:
            await self._queue.delete(m)
        except TransferError as e:  # it comes back, and its job finds its work done
            log.warning("could not delete a message", message=m.id, error=str(e))
            return
        self._metrics.messages["deleted"] += 1

    def _forget(self, name: str) -> None:
        self._held.pop(name, None)
        self._jobs.pop(name, None)


class Pages:
    """A prefix job's objects, put back on the queue a page at a time, each page a job
    of single objects that any daemon may take; its report goes under the parent's."""

    def __init__(self, queue: Queue, parent: str, page_keys: int, page_bytes: int) -> None:
        self._queue = queue
        self.parent = parent
        self.page_keys = page_keys
        self.page_bytes = page_bytes
        self.sent = 0

    async def put(self, specs: list[TransferSpec], sizes: list[int]) -> None:
        """Pages of at most page_keys objects and page_bytes of them (an object larger
        goes alone), in at most PAGE_BYTES of text; the last one sent now too."""
        page: list[str] = []
        size = held = 0
        for spec, bytes_ in zip(specs, sizes, strict=True):
            item = json.dumps(
                {
                    "source": str(spec.source),
                    "destination": str(spec.destination),
                    **spec.options.doc(),
                },
                ensure_ascii=False,
            )
            full = len(page) >= self.page_keys or held + bytes_ > self.page_bytes
            if page and (full or size + len(item) > PAGE_BYTES):
                await self._send(page)
                page, size, held = [], 0, 0
            page.append(item)
            size += len(item) + 1
            held += bytes_
        if page:
            await self._send(page)

    async def _send(self, items: list[str]) -> None:
        await self._queue.send('{"transfers": [' + ",".join(items) + "]}", parent=self.parent)
        self.sent += 1


async def _none(stop: asyncio.Event) -> AsyncGenerator[str, None]:
    await stop.wait()
    return
    yield  # an async generator that yields nothing
