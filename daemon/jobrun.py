"""One job's transfers: admitted under the bound on transfers in flight, each copied
by the Copier and recorded in the state as it starts, moves and ends.

A job's transfers run in one TaskGroup; a prefix is expanded a page at a time
(expand.py) as slots free up. One transfer at a time writes a blob, across jobs: a
commit drops every block of the blob it does not list, so two at once would fail one
of them. This is the part of the daemon `blobferry copy` runs too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from daemon.budget import Budget
from daemon.errors import Interrupted, StateError, TransferError, redact
from daemon.expand import Expansion
from daemon.holdings import Holdings, Known
from daemon.jobs import TransferSpec
from daemon.metrics import Metrics
from daemon.objects import Listed
from daemon.outcome import JobStatus, Status
from daemon.progress import JobProgress
from daemon.s3 import S3Reader
from daemon.seams import BlobId
from daemon.settings import Settings
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
    transient: int = 0  # of failed: for reasons a later attempt may not meet

    @property
    def status(self) -> JobStatus:
        if self.interrupted:
            return JobStatus.INTERRUPTED
        return JobStatus.FAILED if self.failed else JobStatus.DONE


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


def internal_error(e: BaseException) -> str:
    """What a bug says in a report: the first real exception, not a TaskGroup's wrapper."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return redact(f"internal error: {type(e).__name__}: {e}")


class _Tracker:
    """One transfer's progress: a log line and a state update every few seconds."""

    def __init__(self, runner: JobRunner, job: str, seq: int, total: int | None) -> None:
        self._sup = runner
        self._job, self._seq = job, seq
        self.total = total
        self.done = 0
        self.reused = 0  # of done: staged by an earlier run, not moved by this one
        self.t0 = time.monotonic()
        self._last = self.t0

    def sized(self, size: int) -> None:
        """The object's size, once a HEAD told it: recorded at once, for the screens."""
        self.total = size
        if self._sup.watcher is not None:
            self._sup.watcher.sized(self._seq, size)
        self._sup.state.transfer_progress(self._job, self._seq, self.done, size, self.reused)

    def advance(self, n: int, *, reused: bool = False) -> None:
        watcher = self._sup.watcher
        self.done += n
        now = time.monotonic()
        if reused:
            # Done, but not moved: kept out of the throughput (the metric's rate(), the
            # transfer's rate and what `blobferry status` estimates from it), and
            # recorded at once, so the estimate is right from its first reading.
            self.reused += n
        else:
            self._sup.metrics.streamed(n)
        if watcher is not None and n:
            watcher.advanced(self._seq, n, reused)
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


class JobRunner:
    """Runs jobs' transfers under one bound (``slots``, one unit per transfer)."""

    def __init__(
        self,
        settings: Settings,
        s3: S3Reader,
        copier: Copier,
        state: StateStore,
        stop: asyncio.Event,
        slots: Budget,
        metrics: Metrics,
        *,
        watcher: JobProgress | None = None,
        own_slot: Callable[[str], bool] = lambda job: False,
        cancel_requested: Callable[[str], bool] = lambda job: False,
    ) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.watcher = watcher  # told every step of every transfer: a screen's
        self._s3 = s3
        self._copier = copier
        self._stop = stop
        self._slots = slots
        # Whether a job has a slot of its own to hand its first transfer (and hands it).
        self._own_slot = own_slot
        self._cancel_requested = cancel_requested
        self._writing: dict[BlobId, _Writers] = {}  # a blob -> its transfers
        self._last_flush = time.monotonic()

    def flush_soon(self) -> None:
        now = time.monotonic()
        if now - self._last_flush >= 1.0:
            self._last_flush = now
            self.state.flush()

    async def run_job(
        self, name: str, specs: Sequence[TransferSpec], tally: Tally | None = None
    ) -> JobStatus:
        """Run every transfer of a job whose start the caller has recorded
        (``state.job_started``); returns DONE, FAILED or INTERRUPTED. ``tally``, when
        given, is counted in (the caller reads it after)."""
        structlog.contextvars.bind_contextvars(job=name)
        tally = tally if tally is not None else Tally()
        t0 = time.monotonic()
        seq = 0
        async with asyncio.TaskGroup() as tg:
            for spec in specs:
                if spec.source.is_prefix:
                    seq = await self._admit_prefix(tg, name, seq, spec, tally)
                else:
                    if self.watcher is not None:
                        self.watcher.found(1, 0)  # its size comes with its HEAD
                    await self._admit(tg, name, seq, spec, None, tally)
                    seq += 1
        status = tally.status
        if status is not JobStatus.INTERRUPTED:
            self.state.job_finished(name, status, excluded=tally.excluded)
        else:
            self.state.flush()
        log.info(
            f"job {status}",
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
        order; returns the next number."""
        expansion = Expansion(spec, seq)
        holdings: Holdings | None = None
        watcher = self.watcher
        if watcher is not None:
            watcher.listing_started()
        try:
            holdings = await self._copier.holdings(spec)
            first = self.settings.max_transfers
            async for found in expansion.pages(self._s3, holdings, first, self._stop):
                if watcher is not None:
                    watcher.found(len(found), sum(f.listed.size for f in found))
                for f in found:
                    await self._admit(tg, job, f.seq, f.spec, f.listed, tally, f.known)
        except TransferError as e:
            self._record_failure(job, expansion.seq, spec, tally, str(e))
            return expansion.seq + 1
        finally:
            tally.excluded += expansion.excluded
            if watcher is not None:
                watcher.listing_ended()
            if holdings is not None:
                await holdings.aclose()
        if expansion.interrupted:
            tally.interrupted += 1
            return expansion.seq
        error = expansion.nothing_found()
        if error is not None:
            self._record_failure(job, expansion.seq, spec, tally, error)
            return expansion.seq + 1
        return expansion.seq

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
        if not self._own_slot(job):  # the one the job took as it began is this one's
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
        status: Status,
        done: int,
        error: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """A transfer's end, recorded and counted."""
        self.state.transfer_finished(job, seq, status, done, error, detail)
        self.metrics.transfers[str(status)] += 1
        if self.watcher is not None:
            self.watcher.ended(seq, status)

    def _record_failure(
        self, job: str, seq: int, spec: TransferSpec, tally: Tally, error: str
    ) -> None:
        self.state.transfer_started(job, seq, str(spec.source), str(spec.destination))
        if self.watcher is not None:
            self.watcher.found(1, 0)
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
        if self.watcher is not None:
            self.watcher.started(seq, src, tracker.total)
        log.info("transfer started", bytes=tracker.total)
        try:
            async with self._sole_writer(self._copier.identify(spec.destination)):
                outcome = await self._copier.copy(
                    spec, listed, tracker.advance, known, tracker.sized
                )
        except Interrupted:
            tally.interrupted += 1
            self._ended(job, seq, Status.INTERRUPTED, tracker.done)
            log.info("interrupted", bytes=tracker.done)
            return
        except asyncio.CancelledError:
            if self._cancel_requested(job):
                self._ended(job, seq, Status.CANCELLED, tracker.done)
                log.info("cancelled", bytes=tracker.done)
            raise
        except TransferError as e:
            tally.failed += 1
            tally.transient += int(e.transient)
            error = redact(str(e))
            self._ended(job, seq, Status.FAILED, tracker.done, error)
            log.error("failed", error=error, bytes=tracker.done)
            return
        except StateError:
            raise  # not this transfer's failure: nothing can be recorded any more
        except Exception as e:  # a bug must cost one transfer, never the daemon
            tally.failed += 1
            error = internal_error(e)
            self._ended(job, seq, Status.FAILED, tracker.done, error)
            log.exception("failed", error=error)
            return
        detail = outcome.detail()
        if outcome.landing is not None and outcome.landing.dropped:
            log.warning("properties left off the blob", dropped=sorted(outcome.landing.dropped))
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
