"""Claims jobs, bounds concurrency, records state, drains on shutdown.

The bounds live here, in one place: ``max_transfers`` objects in flight across all
jobs (a job is claimed only when a slot is free, so the inbox is never emptied into
``processing/`` faster than it can be served), and the byte budget shared by every
block of every transfer. Both are a ``Budget``, which a reload resizes in place
(``resize``): lowering either lets what runs finish and admits nothing new until
the load is under the new bound. Every task belongs to a TaskGroup; none is left behind.

A job is cancelled by name (a file in the source's cancel/): one that runs is
stopped where it is (its blocks in flight are dropped, nothing more is committed) and
filed as failed, status "cancelled"; one still waiting is filed so without running.

Shutdown has two phases. ``stop`` is set (by a signal handler, or by a test): no new
job is claimed, no new transfer or block starts, and the blocks in flight finish
within ``grace_s``; jobs not finished stay in ``processing/`` and resume on the next
start. Past the grace period what is left is cancelled, but for jobs already filing
(their report, or their message handed back to a queue), which finish; ``force`` cuts
those too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial

import structlog

from daemon.budget import Budget
from daemon.errors import JobFileError, StateError
from daemon.fanout import spread
from daemon.jobrun import JobRunner, Tally, internal_error, state_failure
from daemon.jobs import TransferSpec, parse_job
from daemon.metrics import Metrics
from daemon.outcome import JobStatus
from daemon.progress import JobProgress
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.sources.base import ClaimedJob, Ending, JobSource
from daemon.state import StateStore
from daemon.transfer import Copier

log = structlog.get_logger("blobferry")


CANCELLED = (
    "cancelled on request; what was copied before stays, nothing of the rest was "
    "committed, and submitting the job again resumes it"
)


@dataclass(slots=True)
class _Job:
    """A claimed job's task, and where it is: cancellable until it starts filing."""

    task: asyncio.Task[None]
    phase: str = "waiting"  # "waiting" to start, "running", "filing"
    cancel_requested: bool = False
    # The transfer slot the job took before anything else, which its first transfer
    # uses: the supervisor claims the next job only once this one has its slot.
    slot: bool = False
    has_slot: asyncio.Event = field(default_factory=asyncio.Event)  # or has ended


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        s3: S3Reader,
        copier: Copier,
        state: StateStore,
        stop: asyncio.Event,
        *,
        grace_s: float = 30.0,
        force: asyncio.Event | None = None,
        watcher: JobProgress | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self._s3 = s3
        self._copier = copier
        self._stop = stop
        self._force = force or asyncio.Event()
        self._grace_s = grace_s
        self._slots = Budget(settings.max_transfers)  # one unit per transfer in flight
        self._jobs: dict[str, _Job] = {}  # claimed from the source, not yet filed
        self._parsing = asyncio.Lock()  # one job file read and parsed at a time
        # Set when the state database cannot be written: the daemon drains and stops.
        self.state_lost: StateError | None = None
        self.metrics = Metrics()
        self._runner = JobRunner(
            settings,
            s3,
            copier,
            state,
            stop,
            self._slots,
            self.metrics,
            watcher=watcher,
            own_slot=self._hand_over_slot,
            cancel_requested=lambda job: job in self._jobs and self._jobs[job].cancel_requested,
        )

    @property
    def claimed_jobs(self) -> int:
        return len(self._jobs)

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        m = self.metrics
        return (
            f"{self.claimed_jobs} jobs, {m.transfers_running} transfers running; "
            f"{m.transfers['copied']} copied, {m.transfers['failed']} failed, "
            f"{m.bytes_copied / 2**20:.0f} MiB since start"
        )

    @property
    def free_slots(self) -> int:
        """Transfers that could start now: how many messages a queue receive asks for."""
        return max(1, self._slots.capacity - self._slots.used)

    @property
    def max_transfers(self) -> int:
        """The bound in force now (a reload may have changed it)."""
        return self._slots.capacity

    def resize(self, settings: Settings) -> None:
        """A reload's new ``max_transfers``, for the next transfer admitted."""
        self.settings = self._runner.settings = settings
        self._slots.resize(settings.max_transfers)

    def _hand_over_slot(self, job: str) -> bool:
        """Whether ``job`` still holds the slot it took as it began; if so, it is now
        its first transfer's."""
        entry = self._jobs.get(job)
        if entry is None or not entry.slot:
            return False
        entry.slot = False
        return True

    # -- the daemon -----------------------------------------------------------------

    async def serve(self, source: JobSource) -> None:
        """Run jobs from ``source`` until ``stop`` is set, then drain."""
        async with asyncio.TaskGroup() as tg:
            jobs: set[asyncio.Task[None]] = set()
            tg.create_task(self._take_cancel_requests(source), name="cancel-requests")
            claims = source.jobs(self._stop)
            try:
                while not self._stop.is_set():
                    # Claim only when a transfer slot is free: back-pressure on the inbox.
                    await self._wait_for_slot(peek=True)
                    if self._stop.is_set():
                        break
                    job = await anext(claims, None)
                    if job is None:
                        break
                    task = tg.create_task(self._run_claimed(source, job), name=f"job {job.name}")
                    jobs.add(task)
                    task.add_done_callback(jobs.discard)
                    entry = self._jobs[job.name] = _Job(task)
                    # The job takes its slot before the next claim: peeking alone, a
                    # burst of jobs was claimed while the first were still being parsed.
                    await entry.has_slot.wait()
            finally:
                await claims.aclose()
            await self._drain(jobs)
        if self.state_lost is None:
            self.state.flush()

    def _lose_state(self, e: StateError) -> None:
        """Nothing can be recorded: stop taking jobs and drain. The jobs in flight stay
        in processing/ and resume on the next start, where they were."""
        if self.state_lost is None:
            self.state_lost = e
            log.error("stopping: the state cannot be written", error=str(e))
            self._stop.set()

    async def _wait_for_slot(self, peek: bool) -> bool:
        """Wait for a free transfer slot, and take it unless ``peek``; False if ``stop``
        came first."""
        waiter = asyncio.ensure_future(self._slots.acquire(1))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a cancel request, a shutdown) while waiting
            stopper.cancel()
            if not waiter.cancel():  # it had the slot already: give it back
                self._slots.release(1)
            raise
        stopper.cancel()
        if waiter.cancel():
            return False  # stop came first
        if peek:
            self._slots.release(1)
        return True

    async def _drain(self, jobs: set[asyncio.Task[None]]) -> None:
        if not jobs:
            return
        log.info("draining", jobs=len(jobs), grace_s=self._grace_s)
        await self._until_done(jobs, self._grace_s)
        # Past the grace, what still runs is cancelled. A job already filing (its report
        # being written, or its message handed back) finishes, as a cancel request lets
        # it: cut there, a queue's message would stay hidden for its visibility timeout.
        # Only force cuts it short.
        filing = {e.task for e in self._jobs.values() if e.phase == "filing"}
        left = [t for t in jobs if self._force.is_set() or t not in filing]
        if left:
            log.warning("cancelling what is left", jobs=len(left))
            for task in left:
                task.cancel()
        await self._until_done(jobs, None)
        for task in list(jobs):  # forced while filing
            task.cancel()

    async def _until_done(self, jobs: set[asyncio.Task[None]], within: float | None) -> None:
        """Until every job in ``jobs`` has ended, ``force`` is set, or ``within`` s pass."""
        if not jobs or self._force.is_set():
            return
        all_done = asyncio.ensure_future(asyncio.wait(set(jobs)))
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait(
                {all_done, force}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            all_done.cancel()
            force.cancel()

    async def _take_cancel_requests(self, source: JobSource) -> None:
        async with aclosing(source.cancel_requests(self._stop)) as names:
            async for name in names:
                try:
                    await self._cancel(source, name)
                except Exception as e:
                    lost = state_failure(e)
                    if lost is not None:
                        self._lose_state(lost)
                        return
                    error = str(e) if isinstance(e, OSError) else internal_error(e)
                    log.exception("cancel failed", job=name, error=error)

    async def _cancel(self, source: JobSource, name: str) -> None:
        """Stop job ``name`` if it runs; file it unrun if it waits."""
        entry = self._jobs.get(name)
        if entry is not None:
            if entry.phase == "filing":
                log.warning("too late to cancel: the job has finished", job=name)
            elif not entry.cancel_requested:
                log.info("cancelling", job=name)
                entry.cancel_requested = True
                if entry.phase == "running":
                    entry.task.cancel()  # a waiting one sees the request as it starts
            return
        job = source.claim(name)
        if job is None:
            log.warning("nothing to cancel: no job of that name waits or runs", job=name)
            return
        self.state.job_started(name)
        self.state.job_finished(name, JobStatus.CANCELLED, "cancelled before it started")
        log.info("job cancelled before it started", job=name)
        await self._file(source, job, Ending(JobStatus.CANCELLED))

    async def _run_claimed(self, source: JobSource, job: ClaimedJob) -> None:
        structlog.contextvars.bind_contextvars(job=job.name)
        try:
            await self._run_and_file(source, job)
        except Exception as e:
            lost = state_failure(e)
            if lost is None:
                raise
            self._lose_state(lost)  # the job is left in processing/, unfiled
        finally:
            entry = self._jobs.get(job.name)
            if entry is not None and entry.task is asyncio.current_task():
                del self._jobs[job.name]  # not a namesake's, claimed once this was filed

    async def _run_and_file(self, source: JobSource, job: ClaimedJob) -> None:
        log.info("claimed", recovered=job.recovered)
        entry = self._jobs[job.name]
        entry.phase = "running"
        started = False
        try:
            if entry.cancel_requested:
                raise asyncio.CancelledError
            entry.slot = await self._wait_for_slot(peek=False)
            entry.has_slot.set()
            self.state.job_started(job.name)
            started = True
            ending = (
                await self._run_file(source, job) if entry.slot else Ending(JobStatus.INTERRUPTED)
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not entry.cancel_requested or (task is not None and task.uncancel() > 0):
                raise  # a shutdown's, not a cancel request's
            status = JobStatus.CANCELLED
            ending = Ending(status)
            if not started:
                self.state.job_started(job.name)
            self.state.job_finished(job.name, status, CANCELLED)
            log.info("job cancelled")
        finally:
            entry.phase = "filing"
            entry.has_slot.set()
            if entry.slot:  # no transfer took it
                entry.slot = False
                self._slots.release(1)
        if ending.status is JobStatus.INTERRUPTED:
            log.info("job interrupted, handed back to resume")
            await source.release(job)
            return
        await self._file(source, job, ending)

    async def _run_file(self, source: JobSource, job: ClaimedJob) -> Ending:
        try:
            # A large job file takes seconds to parse: not on the loop serving sockets,
            # and one at a time, so a burst of large files costs one parse's memory.
            async with self._parsing:
                specs = await asyncio.to_thread(parse_job, await source.read(job))
        except JobFileError as e:
            self.state.job_finished(job.name, JobStatus.FAILED, str(e))
            log.error("job failed", error=str(e))
            return Ending(JobStatus.FAILED, poison=True)
        tally = Tally()
        try:
            pages = source.spreader(job)
            if pages is not None and any(s.source.is_prefix for s in specs):
                tally = await spread(job.name, specs, self._s3, self.state, pages, self._stop)
                status = tally.status
                if status is not JobStatus.INTERRUPTED:
                    self.state.job_finished(job.name, status, excluded=tally.excluded)
            else:
                status = await self._runner.run_job(job.name, specs, tally)
        except Exception as e:  # a bug must cost one job, never the daemon
            if state_failure(e) is not None:
                raise
            error = internal_error(e)
            self.state.job_finished(job.name, JobStatus.FAILED, error)
            log.exception("job failed", error=error)
            return Ending(JobStatus.FAILED)
        return Ending(status, transient=tally.transient > 0)

    async def _file(self, source: JobSource, job: ClaimedJob, ending: Ending) -> None:
        self.metrics.jobs[ending.status] += 1
        try:
            await source.finish(job, ending, partial(self.state.write_report, job.name))
        except Exception as e:
            # A full disk or a folder in the report's place (or a bug). The job's outcome
            # is in the state; its file stays in processing/ and is filed next start.
            log.error(
                "job not filed, it stays in processing/ until the next start",
                status=ending.status,
                error=str(e) if isinstance(e, OSError) else internal_error(e),
                exc_info=not isinstance(e, OSError),
            )

    async def run_job(self, name: str, specs: Sequence[TransferSpec]) -> JobStatus:
        """Run every transfer of a job whose start the caller has recorded
        (``state.job_started``); returns DONE, FAILED or INTERRUPTED."""
        return await self._runner.run_job(name, specs)
