"""A job's record and its transfers' as the state database holds them, and the report
they make: typed rows that serialise themselves, streamed one transfer at a time so a
job of 100,000 transfers is never held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from daemon.outcome import Status
from daemon.progress import seconds_left


def iso(ts: float | None) -> str | None:
    return (
        None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    )


@dataclass(frozen=True, slots=True)
class JobRow:
    job: str
    status: str
    started_at: float
    finished_at: float | None
    error: str | None
    transfers: int
    copied: int
    skipped: int
    failed: int
    bytes_done: int
    excluded: int = 0  # objects under a prefix its include/exclude left out
    would_copy: int = 0  # a dry run's skipped objects that a copy would copy ...
    would_copy_bytes: int = 0  # ... and their bytes


@dataclass(frozen=True, slots=True)
class TransferRow:
    seq: int
    source: str
    destination: str
    status: str
    bytes_total: int | None
    bytes_done: int
    started_at: float
    updated_at: float
    finished_at: float | None
    error: str | None
    detail: dict[str, Any]
    bytes_reused: int = 0  # of bytes_done: staged by an earlier run, not moved by this one

    @property
    def seconds(self) -> float:
        return round((self.finished_at or self.updated_at) - self.started_at, 3)

    @property
    def rate(self) -> float:
        """Bytes moved a second: reused ones took no time and are left out."""
        moved = self.bytes_done - self.bytes_reused
        return moved / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        """For a running transfer of known size: how long it has to go at its rate so
        far; None when nothing can be said yet."""
        if self.status != Status.RUNNING or not self.bytes_total:
            return None
        return seconds_left(self.bytes_total - self.bytes_done, self.rate)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "destination": self.destination,
            "status": self.status,
            "bytes": self.bytes_done,
            "seconds": self.seconds,
        }
        if self.status == Status.RUNNING and self.bytes_total:  # `blobferry status JOB --json`
            out["bytes_total"] = self.bytes_total
            if (left := self.seconds_left) is not None:
                out["seconds_left"] = round(left)
        if self.bytes_reused:
            out["bytes_reused"] = self.bytes_reused
        if self.error:
            out["error"] = self.error
        out.update(self.detail)
        return out


def write_report(
    job: str,
    fp: IO[str],
    job_row: Callable[[str], JobRow | None],
    transfers: Callable[[str], Iterator[TransferRow]],
) -> str:
    """Stream the job's report as JSON into ``fp``; returns the job's status."""
    row = job_row(job)
    assert row is not None, job
    head: dict[str, Any] = {
        "job": job,
        "status": row.status,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "summary": {
            "transfers": row.transfers,
            "copied": row.copied,
            "skipped": row.skipped,
            "failed": row.failed,
            "excluded": row.excluded,
            "bytes": row.bytes_done,
        },
    }
    if row.would_copy:  # a dry run: what it is run for, without adding it up by hand
        head["summary"]["would_copy"] = {
            "objects": row.would_copy,
            "bytes": row.would_copy_bytes,
        }
    if row.error:
        head["error"] = row.error
    text = json.dumps(head, indent=2, ensure_ascii=False)
    fp.write(text[:-2] + ',\n  "transfers": [')
    for i, t in enumerate(transfers(job)):
        fp.write(("," if i else "") + "\n    " + json.dumps(t.report(), ensure_ascii=False))
    fp.write("\n  ]\n}\n")
    return row.status
