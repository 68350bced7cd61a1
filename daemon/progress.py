"""How far a job is: bytes and objects done of how many, the recent rate, the time to go.

Computed here alone, and read by what a person sees: the screen of `blobferry copy`,
`blobferry status` (and its ``--watch``), and the throughput gauge on /metrics. The
rate is recent (the last ``WINDOW_S`` seconds), not since the start: a copy that sped
up or stalled says so at once. Bytes a resume found staged are done, but took no time:
they count towards the total and never towards the rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.outcome import Status

if TYPE_CHECKING:
    from daemon.records import TransferRow

WINDOW_S = 10.0
_RESOLUTION_S = 0.2  # readings closer than this replace each other: at most 50 kept


class RecentRate:
    """Bytes a second over the last ``window`` seconds, from readings of a running total."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self._window = window
        self._readings: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        readings = self._readings
        if len(readings) > 1 and now - readings[-2][0] < _RESOLUTION_S:
            readings[-1] = (now, total)
        else:
            readings.append((now, total))
        while len(readings) > 2 and now - readings[1][0] >= self._window:
            readings.popleft()

    def rate(self, now: float | None = None) -> float:
        if len(self._readings) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._readings[0], self._readings[-1]
        # A reading taken before a quiet spell: the rate falls while nothing moves.
        t1 = max(t1, now if now is not None else t1)
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def seconds_left(remaining: int, rate: float) -> float | None:
    """At ``rate`` bytes a second, the time ``remaining`` bytes take; None when the rate
    says nothing yet."""
    if remaining <= 0:
        return 0.0
    return remaining / rate if rate > 0 else None


@dataclass(slots=True)
class InFlight:
    name: str
    size: int | None
    done: int = 0


@dataclass(frozen=True, slots=True)
class View:
    """A moment of a job, as the screens show it."""

    bytes_done: int
    bytes_total: int
    listing: bool  # the total still grows: a prefix is being listed
    objects_done: int
    objects_total: int
    copied: int
    skipped: int
    failed: int
    rate: float  # bytes a second, recently
    seconds_left: float | None
    largest: tuple[InFlight, ...]  # the largest transfers in flight

    @property
    def fraction(self) -> float | None:
        if self.listing or not self.bytes_total:
            return None if self.listing else (1.0 if self.objects_done else None)
        return min(self.bytes_done / self.bytes_total, 1.0)


@dataclass
class JobProgress:
    """A running job's progress, told by the job runner as it goes (a Watcher)."""

    bytes_total: int = 0
    bytes_done: int = 0
    objects_total: int = 0
    listing: int = 0  # prefixes being listed
    counts: dict[Status, int] = field(default_factory=dict)
    moved: int = 0  # bytes moved by this run: the rate's
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    _rate: RecentRate = field(default_factory=RecentRate)

    def listing_started(self) -> None:
        self.listing += 1

    def found(self, objects: int, size: int) -> None:
        """A page of a listing, or one object named by the job (size 0: not yet known)."""
        self.objects_total += objects
        self.bytes_total += size

    def listing_ended(self) -> None:
        self.listing -= 1

    def started(self, seq: int, name: str, size: int | None) -> None:
        self.in_flight[seq] = InFlight(name, size)

    def sized(self, seq: int, size: int) -> None:
        """A transfer's size, learnt once it began (one object named by the job)."""
        one = self.in_flight.get(seq)
        if one is not None and one.size is None:
            one.size = size
            self.bytes_total += size

    def advanced(self, seq: int, n: int, reused: bool) -> None:
        self.bytes_done += n
        one = self.in_flight.get(seq)
        if one is not None:
            one.done += n
        if not reused:
            self.moved += n
            self._rate.add(time.monotonic(), self.moved)

    def ended(self, seq: int, status: Status) -> None:
        one = self.in_flight.pop(seq, None)
        self.counts[status] = self.counts.get(status, 0) + 1
        if one is not None and status is not Status.COPIED:
            # Skipped or failed: what it would have moved is no part of the job now.
            self.bytes_total -= (one.size or 0) - one.done

    def view(self, largest: int = 3) -> View:
        now = time.monotonic()
        rate = self._rate.rate(now)
        done = sum(self.counts.values())
        flying = sorted(self.in_flight.values(), key=lambda t: -(t.size or 0))[:largest]
        return View(
            bytes_done=self.bytes_done,
            bytes_total=max(self.bytes_total, self.bytes_done),
            listing=self.listing > 0,
            objects_done=done,
            objects_total=max(self.objects_total, done + len(self.in_flight)),
            copied=self.counts.get(Status.COPIED, 0),
            skipped=self.counts.get(Status.SKIPPED, 0),
            failed=self.counts.get(Status.FAILED, 0),
            rate=rate,
            seconds_left=None
            if self.listing
            else seconds_left(self.bytes_total - self.bytes_done, rate),
            largest=tuple(flying),
        )


def from_rows(rows: Sequence[TransferRow], rate: RecentRate, largest: int = 3) -> View:
    """The view of jobs from their rows in the state database (``blobferry status
    --watch``): ``rate`` is fed the bytes moved at each reading, so successive calls
    give the recent rate as the copy's own screen has it."""
    done = total = moved = 0
    finished = 0
    counts: dict[str, int] = {}
    flying: list[InFlight] = []
    for t in rows:
        done += t.bytes_done
        moved += t.bytes_done - t.bytes_reused
        if t.status == Status.RUNNING:
            total += max(t.bytes_total or 0, t.bytes_done)
            flying.append(InFlight(t.source, t.bytes_total, t.bytes_done))
        else:
            finished += 1
            counts[t.status] = counts.get(t.status, 0) + 1
            total += t.bytes_done
    rate.add(time.monotonic(), moved)
    r = rate.rate(time.monotonic())
    flying.sort(key=lambda t: -(t.size or 0))
    return View(
        bytes_done=done,
        bytes_total=total,
        listing=False,
        objects_done=finished,
        objects_total=len(rows),
        copied=counts.get(Status.COPIED, 0),
        skipped=counts.get(Status.SKIPPED, 0),
        failed=counts.get(Status.FAILED, 0),
        rate=r,
        seconds_left=seconds_left(total - done, r),
        largest=tuple(flying[:largest]),
    )
