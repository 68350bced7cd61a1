"""What a transfer and a job come to: their statuses, and a transfer's Outcome.

One enum for each, used everywhere a status is written, counted or compared: the
state database, the reports, /metrics and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from daemon.properties import Landing


class Status(StrEnum):
    """A transfer's."""

    RUNNING = "running"
    COPIED = "copied"
    SKIPPED = "skipped"
    DELETED = "deleted"  # delete: S3 no longer holds the object, and its blob went too
    SPREAD = "spread"  # a queue's prefix, put back on the queue as pages (fanout.py)
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # by a drain: resumes on the next start
    CANCELLED = "cancelled"  # by a cancel request


class JobStatus(StrEnum):
    """A job's."""

    RUNNING = "running"
    DONE = "done"  # every transfer copied or skipped
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"


DRY_RUN = "dry run: would be copied"


class Progress(Protocol):
    """A transfer's bytes done: moved now, or ``reused``: found staged by an earlier
    run, done without moving (no throughput, no rate)."""

    def __call__(self, n: int, *, reused: bool = False) -> None: ...


def unwatched(n: int, *, reused: bool = False) -> None:
    """The Progress of a copy no one watches."""


@dataclass(slots=True)
class Outcome:
    """What became of one object."""

    status: Status
    bytes: int = 0
    verified: str | None = None
    note: str | None = None
    # How the blob's properties landed: metadata keys renamed, values left off.
    landing: Landing | None = None
    blocks_reused: int = 0
    # How the bytes went: "whole" (one GET, one Put Blob, held here), "pipe" (one GET
    # streamed into one Put Blob), "blocks" (ranges staged in parallel) or "server-side".
    route: str | None = None
    would_copy: int | None = None  # a dry run's: the bytes a copy would move

    def detail(self) -> dict[str, object]:
        """The report's fields beyond status and bytes: only those that say something."""
        out: dict[str, object] = {}
        if self.route:
            out["route"] = self.route
        if self.verified:
            out["verified"] = self.verified
        if self.note:
            out["note"] = self.note
        if self.would_copy is not None:
            out["would_copy"] = self.would_copy
        landing = self.landing
        if landing is not None and landing.renamed:
            out["renamed_metadata"] = landing.renamed
        if landing is not None and landing.rewritten:
            out["rewritten"] = landing.rewritten
        if landing is not None and landing.dropped:
            out["dropped"] = landing.dropped
        if self.blocks_reused:
            out["blocks_reused"] = self.blocks_reused
        return out
