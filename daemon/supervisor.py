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
start. Past the grace period, or when ``force`` is set, what is left is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import structlog

from daemon.budget import Budget
from daemon.errors import Interrupted, JobFileError, StateError, TransferError, redact
from daemon.holdings import Holdings, Known
from daemon.jobs import TransferSpec, parse_job
from daemon.metrics import Metrics
from daemon.objects import Listed
from daemon.outcome import Progress, Status
from daemon.s3 import S3Reader
from daemon.seams import BlobId
from daemon.settings import Settings
from daemon.sources.base import ClaimedJob, JobSource
from daemon.state import StateStore
from daemon.transfer import Copier

log = structlog.get_logger("blobferry")


@dataclass(slots=True)
class Tally:
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: int = 0
    excluded: int = 0  # objects under a prefix its include/exclude left out

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "failed" if self.failed else "done"


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


@dataclass(slots=True)
class _Writers:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0  # transfers holding or waiting for the lock


def state_failure(e: BaseException) -> StateError | None:
    """The StateError in ``e`` (itself, or inside TaskGroups' exception groups), if any."""
    if isinstance(e, StateError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            found = state_failure(inner)
            if found is not None:
                return found
    return None


def _internal_error(e: BaseException) -> str:
    """What a bug says in a report: the first real exception, not a TaskGroup's wrapper."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return redact(f"internal error: {type(e).__name__}: {e}")


class _Tracker:
    """One transfer's progress: a log line and a state update every few seconds."""

    def __init__(self, sup: Supervisor, job: str, seq: int, total: int | None) -> None:
        self._sup = sup
        self._job, self._seq = job, seq
        self.total = total
        self.done = 0
        self.reused = 0  # of done: staged by an earlier run, not moved by this one
        self.t0 = time.monotonic()
        self._last = self.t0

    def advance(self, n: int, *, reused: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if reused:
            # Done, but not moved: kept out of the throughput (the metric's rate(), the
            # transfer's rate and what `blobferry status` estimates from it), and
            # recorded at once, so the estimate is right from its first reading.
            self.reused += n
        else:
            self._sup.metrics.streamed(n)
        if self._sup.on_progress is not None:
            self._sup.on_progress(n, reused=reused)
        if reused or now - self._last >= self._sup.settings.progress_interval_s:
            self._last = now
            self._sup.state.transfer_progress(
                self._job, self._seq, self.done, self.total, self.reused
            )
            self._sup.flush_soon()
            log.info("progress", bytes=self.done, total=self.total, rate=self.rate())

    def rate(self) -> float:
        """Bytes moved a second (reused ones left out)."""
        seconds = time.monotonic() - self.t0
        return round((self.done - self.reused) / seconds, 1) if seconds > 0 else 0.0


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
        on_progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.on_progress = on_progress
        self._s3 = s3
        self._copier = copier
        self._stop = stop
        self._force = force or asyncio.Event()
        self._grace_s = grace_s
        self._slots = Budget(settings.max_transfers)  # one unit per transfer in flight
        self._last_flush = time.monotonic()
        self._jobs: dict[str, _Job] = {}  # claimed from the source, not yet filed
        self._writing: dict[BlobId, _Writers] = {}  # a blob -> its transfers
        self._parsing = asyncio.Lock()  # one job file read and parsed at a time
        # Set when the state database cannot be written: the daemon drains and stops.
        self.state_lost: StateError | None = None
        self.metrics = Metrics()

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
    def max_transfers(self) -> int:
        """The bound in force now (a reload may have changed it)."""
        return self._slots.capacity

    def resize(self, settings: Settings) -> None:
        """A reload's new ``max_transfers``, for the next transfer admitted."""
        self.settings = settings
        self._slots.resize(settings.max_transfers)

    def flush_soon(self) -> None:
        now = time.monotonic()
        if now - self._last_flush >= 1.0:
            self._last_flush = now
            self.state.flush()

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
        all_done = asyncio.ensure_future(asyncio.wait(set(jobs)))
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait(
                {all_done, force}, timeout=self._grace_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            all_done.cancel()
            force.cancel()
        if jobs:
            log.warning("cancelling what is left", jobs=len(jobs))
            for task in list(jobs):
                task.cancel()

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
                    error = str(e) if isinstance(e, OSError) else _internal_error(e)
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
        self.state.job_finished(name, "cancelled", "cancelled before it started")
        log.info("job cancelled before it started", job=name)
        await self._file(source, job, "cancelled")

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
            status = await self._run_file(source, job) if entry.slot else "interrupted"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not entry.cancel_requested or (task is not None and task.uncancel() > 0):
                raise  # a shutdown's, not a cancel request's
            status = "cancelled"
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
        if status == "interrupted":
            log.info("job interrupted, resumes on next start")
            return
        await self._file(source, job, status)

    async def _run_file(self, source: JobSource, job: ClaimedJob) -> str:
        try:
            # A large job file takes seconds to parse: not on the loop serving sockets,
            # and one at a time, so a burst of large files costs one parse's memory.
            async with self._parsing:
                specs = await asyncio.to_thread(parse_job, await source.read(job))
        except JobFileError as e:
            self.state.job_finished(job.name, "failed", str(e))
            log.error("job failed", error=str(e))
            return "failed"
        try:
            return await self.run_job(job.name, specs)
        except Exception as e:  # a bug must cost one job, never the daemon
            if state_failure(e) is not None:
                raise
            error = _internal_error(e)
            self.state.job_finished(job.name, "failed", error)
            log.exception("job failed", error=error)
            return "failed"

    async def _file(self, source: JobSource, job: ClaimedJob, status: str) -> None:
        self.metrics.jobs[status] += 1
        try:
            await source.finish(job, status == "done", partial(self.state.write_report, job.name))
        except Exception as e:
            # A full disk or a folder in the report's place (or a bug). The job's outcome
            # is in the state; its file stays in processing/ and is filed next start.
            log.error(
                "job not filed, it stays in processing/ until the next start",
                status=status,
                error=str(e) if isinstance(e, OSError) else _internal_error(e),
                exc_info=not isinstance(e, OSError),
            )

    # -- one job (the daemon's and `blobferry copy`'s) --------------------------------

    async def run_job(self, name: str, specs: Sequence[TransferSpec]) -> str:
        """Run every transfer of a job whose start the caller has recorded
        (``state.job_started``); returns "done", "failed" or "interrupted"."""
        structlog.contextvars.bind_contextvars(job=name)
        tally = Tally()
        t0 = time.monotonic()
        seq = 0
        async with asyncio.TaskGroup() as tg:
            for spec in specs:
                if spec.source.is_prefix:
                    seq = await self._admit_prefix(tg, name, seq, spec, tally)
                else:
                    await self._admit(tg, name, seq, spec, None, tally)
                    seq += 1
        status = tally.status
        if status != "interrupted":
            self.state.job_finished(name, status, excluded=tally.excluded)
        else:
            self.state.flush()
        log.info(
            "job " + status,
            copied=tally.copied,
            skipped=tally.skipped,
            failed=tally.failed,
            **({"excluded": tally.excluded} if tally.excluded else {}),
            seconds=round(time.monotonic() - t0, 3),
        )
        return status

    async def _admit_prefix(
        self, tg: asyncio.TaskGroup, job: str, seq: int, spec: TransferSpec, tally: Tally
    ) -> int:
        """Admit every object under ``spec``'s prefix, numbered from ``seq`` in key
        order; returns the next number. The first page fills every slot at once; later
        pages arrive while earlier ones are copied."""
        start = seq
        keys = spec.options.keys
        skip = len(spec.source.key)
        excluded_before = tally.excluded
        holdings: Holdings | None = None
        try:
            holdings = await self._copier.holdings(spec)
            first = self.settings.max_transfers
            async with aclosing(self._s3.pages(spec.source, first)) as pages:
                async for page in pages:
                    if self._stop.is_set():
                        # Stopping: the rest is listed again on the next start.
                        tally.interrupted += 1
                        return seq
                    if keys is not None:
                        n = len(page)
                        page = [o for o in page if keys.admits(o.key[skip:])]
                        tally.excluded += n - len(page)
                    # A transfer's number (its place in the report) follows key order,
                    # but a page's largest objects start first, so a job never ends on
                    # one large object copying alone.
                    numbered = sorted(enumerate(page, seq), key=lambda n: -n[1].size)
                    seq += len(page)
                    specs = {o.key: spec.for_key(o.key) for o in page}
                    known = {}
                    if holdings is not None:
                        known = await holdings.known(s.destination.blob for s in specs.values())
                    for n, listed in numbered:
                        one = specs[listed.key]
                        await self._admit(
                            tg, job, n, one, listed, tally, known.get(one.destination.blob)
                        )
        except TransferError as e:
            self._record_failure(job, seq, spec, tally, str(e))
            return seq + 1
        finally:
            if holdings is not None:
                await holdings.aclose()
        if seq == start:
            error = f"no objects under {spec.source}; check the prefix"
            if excluded := tally.excluded - excluded_before:
                error = (
                    f"none of the {excluded} objects under {spec.source} is chosen by "
                    "the job's include and exclude; check the patterns"
                )
            self._record_failure(job, seq, spec, tally, error)
            return seq + 1
        return seq

    async def _admit(
        self,
        tg: asyncio.TaskGroup,
        job: str,
        seq: int,
        spec: TransferSpec,
        listed: Listed | None,
        tally: Tally,
        known: Known | None = None,
    ) -> None:
        if self._stop.is_set():
            tally.interrupted += 1
            return
        entry = self._jobs.get(job)
        if entry is not None and entry.slot:
            entry.slot = False  # the one the job took as it began: now this transfer's
        else:
            await self._slots.acquire(1)
        self.metrics.transfers_running += 1
        task = tg.create_task(self._transfer(job, seq, spec, listed, tally, known))
        task.add_done_callback(self._transfer_done)

    def _transfer_done(self, _: asyncio.Task[None]) -> None:
        self.metrics.transfers_running -= 1
        self._slots.release(1)

    def _ended(
        self,
        job: str,
        seq: int,
        status: str,
        done: int,
        error: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """A transfer's end, recorded and counted."""
        self.state.transfer_finished(job, seq, status, done, error, detail)
        self.metrics.transfers[str(status)] += 1

    def _record_failure(
        self, job: str, seq: int, spec: TransferSpec, tally: Tally, error: str
    ) -> None:
        self.state.transfer_started(job, seq, str(spec.source), str(spec.destination))
        self._ended(job, seq, Status.FAILED, 0, redact(error))
        tally.failed += 1
        log.error(
            "failed",
            source=str(spec.source),
            destination=str(spec.destination),
            error=redact(error),
        )

    @asynccontextmanager
    async def _sole_writer(self, dst: BlobId) -> AsyncIterator[None]:
        """One transfer at a time per blob, across jobs: a commit drops every block of
        the blob it does not list, so two at once would fail one of them (Azure's
        InvalidBlockList). A later one waits its turn; the last to commit wins."""
        w = self._writing.get(dst)
        if w is None:
            w = self._writing[dst] = _Writers()
        w.count += 1
        try:
            if w.lock.locked():
                log.info("waiting: another transfer is writing this blob")
            async with w.lock:
                yield
        finally:
            w.count -= 1
            if not w.count:
                del self._writing[dst]

    async def _transfer(
        self,
        job: str,
        seq: int,
        spec: TransferSpec,
        listed: Listed | None,
        tally: Tally,
        known: Known | None = None,
    ) -> None:
        src, dst = str(spec.source), str(spec.destination)
        structlog.contextvars.bind_contextvars(source=src, destination=dst)
        self.state.transfer_started(job, seq, src, dst)
        tracker = _Tracker(self, job, seq, listed.size if listed else None)
        log.info("transfer started", bytes=tracker.total)
        try:
            async with self._sole_writer(self._copier.identify(spec.destination)):
                outcome = await self._copier.copy(spec, listed, tracker.advance, known)
        except Interrupted:
            tally.interrupted += 1
            self._ended(job, seq, "interrupted", tracker.done)
            log.info("interrupted", bytes=tracker.done)
            return
        except asyncio.CancelledError:
            entry = self._jobs.get(job)
            if entry is not None and entry.cancel_requested:
                self._ended(job, seq, "cancelled", tracker.done)
                log.info("cancelled", bytes=tracker.done)
            raise
        except TransferError as e:
            tally.failed += 1
            error = redact(str(e))
            self._ended(job, seq, Status.FAILED, tracker.done, error)
            log.error("failed", error=error, bytes=tracker.done)
            return
        except StateError:
            raise  # not this transfer's failure: nothing can be recorded any more
        except Exception as e:  # a bug must cost one transfer, never the daemon
            tally.failed += 1
            error = _internal_error(e)
            self._ended(job, seq, Status.FAILED, tracker.done, error)
            log.exception("failed", error=error)
            return
        detail: dict[str, object] = {}
        if outcome.route:
            detail["route"] = outcome.route
        if outcome.verified:
            detail["verified"] = outcome.verified
        if outcome.note:
            detail["note"] = outcome.note
        if outcome.would_copy is not None:
            detail["would_copy"] = outcome.would_copy
        landing = outcome.landing
        if landing is not None and landing.renamed:
            detail["renamed_metadata"] = landing.renamed
        if landing is not None and landing.rewritten:
            detail["rewritten"] = landing.rewritten
        if landing is not None and landing.dropped:
            detail["dropped"] = landing.dropped
            log.warning("properties left off the blob", dropped=sorted(landing.dropped))
        if outcome.blocks_reused:
            detail["blocks_reused"] = outcome.blocks_reused
        if outcome.status is Status.SKIPPED:
            tally.skipped += 1
        else:
            tally.copied += 1
            self.metrics.bytes_copied += outcome.bytes
        self._ended(job, seq, outcome.status, outcome.bytes, None, detail)
        self.flush_soon()
        log.info(
            str(outcome.status),
            bytes=outcome.bytes,
            seconds=round(time.monotonic() - tracker.t0, 3),
            rate=tracker.rate(),
            **detail,
        )
