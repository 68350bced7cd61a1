"""The durable record of jobs and transfers (SQLite in ``state_dir``).

It is a record, not the source of truth for resuming: Azure's uncommitted block list
says which blocks exist, and the ``processing/`` folder says which jobs are unfinished.
So writes are batched (committed on job events and by the supervisor's ticker) and
nothing is lost that a restart could not rebuild. Transfer rows are also what a job's
report is streamed from, so a job of 100,000 transfers never holds them all in memory.

Another process may share the file (`blobferry copy` beside the daemon, `status`
reading it). So writes wait in memory and go in one short transaction at each flush:
no write lock is held between flushes, however long a transfer stalls. A flush that
finds the lock taken waits ``BUSY_WAIT_S``, then keeps its rows for the next flush: a
lock is something another process releases, never a reason to stop.

A write that fails otherwise (a full disk, most likely) raises StateError, and the
daemon stops: without a record, no report could be trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from daemon.errors import BlobferryError, StateError
from daemon.outcome import JobStatus, Status
from daemon.records import JobRow, TransferRow, write_report

log = structlog.get_logger("blobferry.state")

# How long a write waits for another process's transaction: theirs are as short as ours
# (milliseconds), and this wait blocks the event loop, so it is kept short.
BUSY_WAIT_S = 2.0
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _busy(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", None) in _BUSY


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    excluded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS opened (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transfers (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    bytes_total INTEGER,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_reused INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    detail TEXT,
    PRIMARY KEY (job, seq)
);
"""


# A dry run's outcome for an object a copy would copy: its bytes, in the detail.
_WOULD_COPY = "json_extract(t.detail, '$.would_copy')"


class StateStore:
    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        """``read_only``: for `blobferry status`, which may run as a user who can only
        read the database (one of the daemon's group), and never writes to it."""
        self._path = str(path)
        # Writes not yet committed, in order; a transfer's progress keeps one entry,
        # overwritten in place (so it stays before that transfer's end).
        self._pending: dict[object, tuple[str, tuple[Any, ...]]] = {}
        self._serial = 0
        self._busy_since: float | None = None
        # Why the last write did not go in (another process's lock), or None: /readyz's.
        self.trouble: str | None = None
        # Columns added since the first release: 0 where a database from before lacks
        # them (`blobferry status` reads, never alters, a database the daemon made).
        self._excluded = "j.excluded"
        self._reused = "bytes_reused"
        if read_only:
            try:
                uri = Path(path).absolute().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True)
                self._db.execute("SELECT 1 FROM jobs LIMIT 1")
                self._excluded = "j.excluded" if self._has("jobs", "excluded") else "0"
                self._reused = "bytes_reused" if self._has("transfers", "bytes_reused") else "0"
            except sqlite3.Error as e:
                raise BlobferryError(
                    f"cannot read the state database {self._path} ({e}); reading it takes "
                    "a user of the daemon's group"
                ) from None
            return
        try:
            if isinstance(path, Path):
                path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: a transaction exists only inside _transaction(), never between.
            self._db = sqlite3.connect(self._path, timeout=BUSY_WAIT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StateError(self._path, e) from None
        self._open()

    def _has(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self._db.execute(f"PRAGMA table_info({table})"))

    def _open(self) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StateError(self._path, e) from None
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            if not self._has("jobs", "excluded"):  # a database from before include/exclude
                self._db.execute("ALTER TABLE jobs ADD COLUMN excluded INTEGER NOT NULL DEFAULT 0")
            if not self._has("transfers", "bytes_reused"):  # from before it was told apart
                self._db.execute(
                    "ALTER TABLE transfers ADD COLUMN bytes_reused INTEGER NOT NULL DEFAULT 0"
                )
            # One row written at every start: a disk too full to take it stops the daemon
            # here, with the reason, not at the first job.
            self._db.execute(
                "INSERT OR REPLACE INTO opened (one, at) VALUES (1, ?)", (time.time(),)
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Statements run inside are one transaction, begun (unless already) and
        committed here; on failure it is rolled back and StateError raised."""
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise StateError(self._path, e) from None

    def _write(self, sql: str, args: tuple[Any, ...], key: object = None) -> None:
        """Queue a write for the next flush."""
        if key is None:
            self._serial += 1
            key = self._serial
        self._pending[key] = (sql, args)

    @classmethod
    def in_dir(cls, state_dir: Path) -> StateStore:
        """The daemon's store in ``state_dir``. A database SQLite can no longer read
        (not a database, a malformed image: a damaged disk) stopped the daemon at every
        start, telling to free space. It is a record, and nothing a restart needs lives
        only there, so it is moved aside, named in a warning, and a new one begun."""
        path = state_dir / "blobferry.sqlite3"
        try:
            return cls(path)
        except StateError as e:
            if not e.damaged:  # full, read-only, locked ...
                raise
            aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            try:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(f"{path}{suffix}", f"{aside}{suffix}")
            except OSError:
                raise e from None  # it cannot be moved: say it is damaged, and stop
            log.warning(
                "state database damaged, moved aside; a new one begun",
                error=str(e.cause),
                moved_to=str(aside),
            )
        return cls(path)

    def close(self) -> None:
        with contextlib.suppress(StateError):  # after a StateError this fails again
            self.flush()
        self._db.close()

    def flush(self) -> bool:
        """Commit the writes waiting, in one short transaction. False when another
        process held the lock past BUSY_WAIT_S: they stay for the next flush."""
        if not self._pending:
            return True
        writes = list(self._pending.values())
        try:
            with self._transaction():
                for sql, args in writes:
                    self._db.execute(sql, args)
        except StateError as e:
            if not e.locked:
                raise
            now = time.monotonic()
            if self._busy_since is None:
                self._busy_since = now
            self.trouble = "the state database is locked by another process"
            log.warning(
                "state database locked by another process; its rows wait for the next flush",
                path=self._path,
                waiting_s=round(now - self._busy_since, 1),
                rows=len(writes),
            )
            return False
        if self._busy_since is not None:
            log.info("state database writable again", path=self._path)
            self._busy_since = None
            self.trouble = None
        self._pending.clear()
        return True

    # -- writes ---------------------------------------------------------------------

    def job_started(self, job: str) -> None:
        # A job name seen before (a crash, or a resubmission) starts a fresh record.
        self._write("DELETE FROM transfers WHERE job = ?", (job,))
        self._write(
            "INSERT OR REPLACE INTO jobs (job, status, started_at) VALUES (?, ?, ?)",
            (job, JobStatus.RUNNING, time.time()),
        )
        self.flush()

    def job_finished(
        self, job: str, status: JobStatus, error: str | None = None, excluded: int = 0
    ) -> None:
        self._write(
            "UPDATE jobs SET status = ?, finished_at = ?, error = ?, excluded = ? WHERE job = ?",
            (status, time.time(), error, excluded, job),
        )
        self.flush()

    def transfer_started(self, job: str, seq: int, source: str, destination: str) -> None:
        now = time.time()
        self._write(
            "INSERT OR REPLACE INTO transfers (job, seq, source, destination, status, "
            "started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job, seq, source, destination, Status.RUNNING, now, now),
        )

    def transfer_progress(
        self, job: str, seq: int, done: int, total: int | None, reused: int = 0
    ) -> None:
        """``done`` bytes of ``total``, ``reused`` of them staged by an earlier run."""
        self._write(
            "UPDATE transfers SET bytes_done = ?, bytes_total = ?, bytes_reused = ?, "
            "updated_at = ? WHERE job = ? AND seq = ?",
            (done, total, reused, time.time(), job, seq),
            key=("progress", job, seq),
        )

    def transfer_finished(
        self,
        job: str,
        seq: int,
        status: Status,
        done: int,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        now = time.time()
        self._write(
            "UPDATE transfers SET status = ?, bytes_done = ?, updated_at = ?, finished_at = ?, "
            "error = ?, detail = ? WHERE job = ? AND seq = ?",
            (status, done, now, now, error, json.dumps(detail or {}), job, seq),
        )

    def prune(self, before: float) -> int:
        """Forget the jobs that finished before ``before`` (epoch s), with their
        transfers; returns how many. A job still running, or interrupted and waiting in
        processing/ to resume, is kept whatever its age. Nothing resuming needs lives
        here (that is processing/ and Azure's block lists), and the reports stay in
        done/ and failed/: this only stops a daemon of months growing its database
        without end."""
        old = f"status != '{JobStatus.RUNNING}' AND finished_at < ?"
        self.flush()
        with self._transaction():
            self._db.execute(
                f"DELETE FROM transfers WHERE job IN (SELECT job FROM jobs WHERE {old})", (before,)
            )
            gone: int = self._db.execute(f"DELETE FROM jobs WHERE {old}", (before,)).rowcount
        return gone

    # -- reads ----------------------------------------------------------------------

    def job(self, job: str, db: sqlite3.Connection | None = None) -> JobRow | None:
        rows = self._jobs("WHERE j.job = ?", "", (job,), db)
        return rows[0] if rows else None

    def jobs(self, limit: int = 50) -> list[JobRow]:
        return self._jobs("", "ORDER BY j.started_at DESC LIMIT ?", (limit,))

    def _jobs(
        self, where: str, order: str, args: tuple[Any, ...], db: sqlite3.Connection | None = None
    ) -> list[JobRow]:
        q = (
            "SELECT j.job, j.status, j.started_at, j.finished_at, j.error, "
            f"COUNT(t.seq), SUM(t.status = '{Status.COPIED}'), "
            f"SUM(t.status = '{Status.SKIPPED}'), SUM(t.status = '{Status.FAILED}'), "
            f"COALESCE(SUM(t.bytes_done), 0), {self._excluded}, "
            f"COUNT({_WOULD_COPY}), COALESCE(SUM({_WOULD_COPY}), 0) "
            f"FROM jobs j LEFT JOIN transfers t ON t.job = j.job {where} GROUP BY j.job {order}"
        )
        return [
            JobRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or 0, r[7] or 0, r[8] or 0, *r[9:13])
            for r in (db or self._db).execute(q, args)
        ]

    def transfers(self, job: str, db: sqlite3.Connection | None = None) -> Iterator[TransferRow]:
        cur = (db or self._db).execute(
            "SELECT seq, source, destination, status, bytes_total, bytes_done, started_at, "
            f"updated_at, finished_at, error, detail, {self._reused} FROM transfers "
            "WHERE job = ? ORDER BY seq",
            (job,),
        )
        for r in cur:
            yield TransferRow(
                seq=r[0],
                source=r[1],
                destination=r[2],
                status=r[3],
                bytes_total=r[4],
                bytes_done=r[5],
                started_at=r[6],
                updated_at=r[7],
                finished_at=r[8],
                error=r[9],
                detail=json.loads(r[10]) if r[10] else {},
                bytes_reused=r[11],
            )

    def write_report(self, job: str, fp: IO[str]) -> str:
        """Stream the job's report as JSON into ``fp``; returns the job's status.

        Safe to call from a worker thread: it reads what has been committed through a
        connection of its own, so the event loop's connection is never shared."""
        db = sqlite3.connect(self._path)
        try:
            return write_report(job, fp, lambda j: self.job(j, db), lambda j: self.transfers(j, db))
        finally:
            db.close()
