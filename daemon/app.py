"""The composition root: builds the parts from one Settings and runs them.

``serve`` is the daemon; ``copy_once`` is the one-shot copy. Both take their stop
trigger as an argument (hypercorn's ``shutdown_trigger``), so tests stop them without
signals; the CLI wires signals to the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import structlog

from daemon import metrics
from daemon.azure import AzureWriter
from daemon.budget import Budget
from daemon.errors import ConfigError, StateError, TransferError
from daemon.jobrun import state_failure
from daemon.jobs import TransferSpec
from daemon.logs import set_level
from daemon.outcome import JobStatus
from daemon.progress import JobProgress
from daemon.reload import Reloader
from daemon.results import Results
from daemon.routing import Routes
from daemon.s3 import S3Reader
from daemon.settings import Settings, require_azure
from daemon.sources.base import JobSource
from daemon.sources.directory import DirectorySource
from daemon.sources.merged import MergedSource
from daemon.sources.queue import QueueSource
from daemon.sqs import Queue
from daemon.state import StateStore
from daemon.supervisor import Supervisor
from daemon.systemd import Notifier
from daemon.transfer import Copier

log = structlog.get_logger("blobferry")


@dataclass(slots=True)
class Engine:
    settings: Settings
    s3: S3Reader
    azure: AzureWriter
    budget: Budget
    copier: Copier


@asynccontextmanager
async def engine(settings: Settings, stopping: asyncio.Event) -> AsyncIterator[Engine]:
    require_azure(settings)
    async with S3Reader(settings) as s3, AzureWriter(settings) as azure:
        budget = Budget(settings.memory_bytes)
        # What exists now (botocore's service model, the SDKs' pipelines: most of the
        # heap) lives as long as the process. Frozen, it is left out of the collector's
        # full passes, which otherwise walk all of it: 30-60 ms each, and the first one
        # fell in the first job's first request. Garbage is collected first, not frozen.
        gc.collect()
        gc.freeze()
        yield Engine(settings, s3, azure, budget, Copier(settings, s3, azure, budget, stopping))


def _lock(folder: Path, setting: str) -> IO[bytes]:
    """One daemon per state folder and per jobs folder: a second one would claim the
    jobs the first has recovered from processing/, and copy them twice."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / "daemon.lock", "ab")  # noqa: SIM115 (held for the run)
    except OSError as e:
        raise _unusable(setting, folder, e) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(
            f"configuration error: {setting}: another blobferry daemon is using {folder}"
        ) from None
    return f


def _unusable(setting: str, folder: Path, e: OSError) -> ConfigError:
    return ConfigError(f"configuration error: {setting}: cannot use {folder}: {e.strerror}")


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    force: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    reloader: Reloader | None = None,
) -> None:
    """The daemon: watch ``jobs_dir`` and run what arrives until ``stop`` is set; with
    ``reloader``, apply what can change live each time it is asked."""
    daemon = Daemon(settings, stop, force, reloader)
    try:
        source = daemon.start()
        await daemon.serve(source, on_ready)  # drains when stop is set
    finally:
        daemon.close()
    log.info("stopped")


class Daemon:
    """The daemon's life in named phases: start, serve (which drains once ``stop`` is
    set: the supervisor's two-phase shutdown), close."""

    def __init__(
        self,
        settings: Settings,
        stop: asyncio.Event,
        force: asyncio.Event | None,
        reloader: Reloader | None,
    ) -> None:
        self._settings = self._in_force = settings  # a reload replaces the latter
        self._stop = stop
        self._force = force
        self._reloader = reloader
        self._notifier = Notifier()
        self._locks: list[IO[bytes]] = []
        self._state: StateStore | None = None

    def start(self) -> DirectorySource:
        """One daemon per folder; the state database opened; the jobs folder made."""
        s = self._settings
        self._locks.append(_lock(s.state_dir, "state_dir"))
        if s.jobs_dir != s.state_dir:  # one folder for both: its lock is taken
            self._locks.append(_lock(s.jobs_dir, "jobs_dir"))
        self._state = StateStore.in_dir(s.state_dir)
        _prune(self._state, s)
        source = DirectorySource(
            s.jobs_dir, s.poll_interval_s, s.max_job_file_mb << 20, watch=s.watch
        )
        try:
            source.prepare()
        except OSError as error:
            raise _unusable("jobs_dir", s.jobs_dir, error) from None
        return source

    async def serve(self, folder: DirectorySource, on_ready: Callable[[], None] | None) -> None:
        """Both sides opened, metrics served, ready told; jobs run until ``stop``, then
        drained. A state that could no longer be written is raised at the end: the
        process exits non-zero with the reason, and systemd starts it again."""
        s, state = self._settings, self._state
        assert state is not None, "start() first"
        async with engine(s, self._stop) as e:
            sup = Supervisor(
                s, e.s3, e.copier, state, self._stop, grace_s=s.grace_period_s, force=self._force
            )
            async with contextlib.AsyncExitStack() as stack:
                source = await _with_queue(s, folder, e, sup, stack)
                if s.metrics_address is not None:
                    gauges = partial(_gauges, sup, folder, e)
                    unready = partial(self._unready, state)
                    await stack.enter_async_context(
                        metrics.serving(s.metrics_address, sup.metrics, gauges, unready)
                    )
                self._ready(sup, on_ready)
                await self._run(sup, source, e)
        if sup.state_lost is not None:
            raise sup.state_lost

    def _unready(self, state: StateStore) -> str | None:
        """Why the daemon cannot take work now (for /readyz), or None."""
        if self._stop.is_set():
            return "draining: stopping, no new job is taken"
        return state.trouble

    def _ready(self, sup: Supervisor, on_ready: Callable[[], None] | None) -> None:
        s = self._settings
        log.info(
            "ready",
            pid=os.getpid(),
            jobs_dir=str(s.jobs_dir),
            max_transfers=s.max_transfers,
            memory_mb=s.memory_mb,
            bandwidth_mb_s=s.bandwidth.describe(),
            metrics=s.metrics_address,
        )
        self._notifier.ready(sup.summary())
        if on_ready is not None:
            on_ready()

    async def _run(self, sup: Supervisor, source: JobSource, e: Engine) -> None:
        """The supervisor, and the chores beside it until it returns."""
        state, notifier = self._state, self._notifier
        assert state is not None
        async with asyncio.TaskGroup() as tg:
            chores = [
                tg.create_task(notifier.keepalive(sup.summary)),
                tg.create_task(_prune_daily(state, lambda: self._in_force)),
            ]
            if self._reloader is not None:
                apply = partial(self._apply, e, sup)
                serving = self._reloader.serve(self._settings, apply, notifier, sup.summary)
                chores.append(tg.create_task(serving))
            tg.create_task(_announce_stop(self._stop, notifier, sup))
            await sup.serve(source)
            for chore in chores:
                chore.cancel()

    def _apply(self, e: Engine, sup: Supervisor, live: Settings) -> None:
        """A reload: what changes live takes effect now."""
        assert self._state is not None
        self._in_force = live
        e.s3.bandwidth.set(live.bandwidth)
        e.budget.resize(live.memory_bytes)
        sup.resize(live)
        set_level(live.log_level)
        _prune(self._state, live)

    def close(self) -> None:
        """The state database closed, the folders' locks let go."""
        if self._state is not None:
            self._state.close()
        for lock in reversed(self._locks):
            lock.close()
        self._notifier.close()


async def _with_queue(
    s: Settings,
    folder: DirectorySource,
    e: Engine,
    sup: Supervisor,
    stack: contextlib.AsyncExitStack,
) -> JobSource:
    """The folder's jobs, and the queue's as well when sqs.queue_url is set."""
    if s.sqs.queue_url is None:
        return folder
    queue = await stack.enter_async_context(Queue(s))
    results = Results(s.sqs.results or str(s.jobs_dir / "results"), e.azure, e.s3, s.retry)
    source = QueueSource(s.sqs, queue, results, Routes(s.routes), sup.metrics)
    cap = e.s3.bandwidth
    source.room = lambda: 0 if cap.saturated() else sup.free_slots
    try:
        await stack.enter_async_context(source)
    except TransferError as error:
        raise ConfigError(f"configuration error: sqs.queue_url: {error}") from None
    log.info("taking jobs from the queue too", queue=s.sqs.queue_url, routes=len(s.routes))
    return MergedSource(folder, source)


def _prune(state: StateStore, settings: Settings) -> None:
    """Drop the records of jobs finished more than keep_days ago."""
    if settings.keep_days > 0:
        gone = state.prune(time.time() - settings.keep_days * 86400)
        if gone:
            log.info("old jobs dropped from the state", jobs=gone, keep_days=settings.keep_days)


async def _prune_daily(state: StateStore, settings: Callable[[], Settings]) -> None:
    while True:
        await asyncio.sleep(86400)
        try:
            _prune(state, settings())
        except StateError as e:  # a full disk: the next job's write says so, and stops
            log.warning("old jobs not dropped from the state", error=str(e))


def _gauges(sup: Supervisor, source: DirectorySource, e: Engine) -> dict[str, tuple[str, float]]:
    """What /metrics reads at each scrape, beside the supervisor's counters."""
    budget = e.budget
    cap = e.s3.bandwidth.rate()
    return {
        "jobs_running": ("Jobs claimed and not yet filed.", sup.claimed_jobs),
        "jobs_waiting": ("Job files waiting in inbox/.", source.waiting()),
        "transfers_max": ("The bound on transfers in flight (max_transfers).", sup.max_transfers),
        "memory_budget_bytes": ("The byte budget for blocks (memory_mb).", budget.capacity),
        "memory_used_bytes": ("Bytes of it held by blocks in flight.", budget.used),
        "throughput_bytes_per_second": (
            "Bytes a second moved over the last 10 s, as `blobferry copy` shows it.",
            sup.metrics.throughput(),
        ),
        "bandwidth_cap_bytes_per_second": (
            "The cap on reading from S3 in force now (bandwidth_mb_s); 0: none.",
            cap or 0,
        ),
    }


async def _announce_stop(stop: asyncio.Event, notifier: Notifier, sup: Supervisor) -> None:
    await stop.wait()
    notifier.stopping("draining: " + sup.summary())


async def copy_once(
    settings: Settings,
    name: str,
    specs: Sequence[TransferSpec],
    stop: asyncio.Event,
    watcher: JobProgress | None = None,
) -> tuple[JobStatus, StateStore]:
    """One job run to the end in this process; returns its status and the state."""
    state = StateStore.in_dir(settings.state_dir)
    _prune(state, settings)
    async with engine(settings, stop) as e:
        sup = Supervisor(settings, e.s3, e.copier, state, stop, watcher=watcher)
        try:
            state.job_started(name)
            status = await sup.run_job(name, specs)
        except BaseExceptionGroup as eg:
            lost = state_failure(eg)
            if lost is None:
                raise
            raise lost from None
    return status, state
