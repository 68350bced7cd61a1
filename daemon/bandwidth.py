"""A cap on the bytes a second the daemon reads from S3, all transfers together.

The instance the daemon runs on also runs the service whose files it moves; a copy at
full speed takes that service's network. ``bandwidth_mb_s`` caps it, as rclone's
``--bwlimit`` and AzCopy's ``--cap-mbps`` do: a number of MB/s (10^6 bytes), or a
timetable of them by time of day, such as ``"08:00,20 19:00,off"`` (20 MB/s from 8 in
the morning, no cap from 7 in the evening), or by the week, such as ``"Mon-08:00,20
Fri-19:00,off"`` (capped through the working week, free over the weekend). Streaming
sends on each byte it reads, so the cap holds on the way out too; a block sent to Azure
again after a failure is not read again, and not counted again. In server-side mode
the payload does not pass through the instance, and nothing is capped.

The pacing is one reservation clock (GCRA): each chunk read books its time at the rate
after the ones before it, and its reader waits out what it booked beyond a short burst.
Every reader is served in turn, one clock for all, at O(1) a chunk.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

MB = 1_000_000
BURST_S = 0.2  # reading may run this far ahead of the rate
DAY, WEEK = 1440, 7 * 1440  # minutes
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # as time.localtime's tm_wday
_ENTRY = re.compile(r"(?:([A-Za-z]{3})-)?(\d{1,2}):(\d{2}),(\S+)")


@dataclass(frozen=True, slots=True)
class Timetable:
    """Caps in bytes a second (None: no cap) from each minute of the day, or of the week
    (from Monday 00:00) when an entry names a day, in order."""

    entries: tuple[tuple[int, float | None], ...]
    period: int = DAY

    @property
    def never(self) -> bool:
        return all(rate is None for _, rate in self.entries)

    def at(self, minute: int) -> float | None:
        """The cap in force ``minute`` minutes into the week (from Monday 00:00, local
        time); before the first entry, the last one's still holds (from the day, or the
        week, before)."""
        minute %= self.period
        rate = self.entries[-1][1]
        for start, r in self.entries:
            if start > minute:
                break
            rate = r
        return rate

    def describe(self) -> str:
        def mb(rate: float | None) -> str:
            return "off" if rate is None else f"{rate / MB:g}"

        def when(start: int) -> str:
            day = f"{DAYS[start // DAY].title()}-" if self.period == WEEK else ""
            return f"{day}{start % DAY // 60:02d}:{start % 60:02d}"

        if len(self.entries) == 1 and self.period == DAY:
            return mb(self.entries[0][1])
        return " ".join(f"{when(s)},{mb(r)}" for s, r in self.entries)


def _rate(value: float | str) -> float | None:
    """MB/s (0 or 'off': no cap) as bytes a second."""
    if isinstance(value, str) and value.lower() == "off":
        return None
    try:
        mb = float(value)
    except ValueError:
        mb = float("nan")
    if not 0 <= mb < float("inf"):
        raise ValueError(f"{value!r} is not a number of MB/s or 'off'")
    return None if mb == 0 else mb * MB


def timetable(value: float | str) -> Timetable:
    """``bandwidth_mb_s`` as a Timetable; raises ValueError saying what is wrong.

    Entries are HH:MM,MB/s, separated by spaces or semicolons, as rclone's --bwlimit
    takes them. An entry may name a day (``Mon-08:00,20``, as rclone's do): then the
    timetable runs by the week, and an entry without a day holds at that time every day.
    """
    if not isinstance(value, str):
        return Timetable(((0, _rate(value)),))
    words = value.replace(";", " ").split()
    if len(words) == 1 and "," not in words[0]:
        return Timetable(((0, _rate(words[0])),))
    if not words:
        raise ValueError("is empty; give MB/s, or entries such as '08:00,20 19:00,off'")
    entries: list[tuple[str, str | None, int, float | None]] = []
    for word in words:
        m = _ENTRY.fullmatch(word)
        if m is None:
            raise ValueError(
                f"{word!r} is not HH:MM,MB/s or Day-HH:MM,MB/s (such as 08:00,20, "
                "19:00,off or Sat-00:00,off)"
            )
        day, hh, mm = m.group(1), int(m.group(2)), int(m.group(3))
        if day is not None and day.lower() not in DAYS:
            raise ValueError(f"{word!r}: {day} is not a day (Mon, Tue ... Sun)")
        if hh > 23 or mm > 59:
            raise ValueError(f"{word!r}: {m.group(2)}:{m.group(3)} is not a time of day")
        entries.append((word, day, hh * 60 + mm, _rate(m.group(4))))
    if all(day is None for _, day, _, _ in entries):
        for (_, _, before, _), (word, _, start, _) in pairwise(entries):
            if start <= before:
                raise ValueError(f"{word!r}: the times must rise through the day")
        return Timetable(tuple((start, rate) for _, _, start, rate in entries))
    week: dict[int, tuple[str, float | None]] = {}
    for word, day, start, rate in entries:
        days = range(7) if day is None else [DAYS.index(day.lower())]
        for d in days:
            at = d * DAY + start
            if at in week:
                raise ValueError(f"{word!r}: {week[at][0]!r} already gives that time")
            week[at] = (word, rate)
    return Timetable(tuple((at, week[at][1]) for at in sorted(week)), WEEK)


def _local_minute() -> int:
    """Minutes since Monday 00:00, local time."""
    t = time.localtime()
    return t.tm_wday * DAY + t.tm_hour * 60 + t.tm_min


class Bandwidth:
    """The one clock every read from S3 books its bytes on."""

    def __init__(self, table: Timetable, minute: Callable[[], int] = _local_minute) -> None:
        self._minute = minute
        self._paid_until = 0.0  # loop time by which the bytes booked so far are due
        self._rate: float | None = None
        self.set(table)

    def set(self, table: Timetable) -> None:
        """A new timetable (a reload): read at the next chunk, by every reader."""
        self._table = table
        self.on = not table.never  # False: readers need not book anything
        self._checked = float("-inf")  # loop time the timetable was last read

    def rate(self) -> float | None:
        """The cap now, in bytes a second; None when there is none."""
        return self._rate_at(asyncio.get_running_loop().time())

    def _rate_at(self, now: float) -> float | None:
        if now - self._checked >= 1.0:  # the timetable moves by the minute
            self._checked = now
            rate = self._table.at(self._minute())
            if rate != self._rate:
                self._rate = rate
                self._paid_until = now  # a new cap starts afresh
        return self._rate

    def saturated(self) -> bool:
        """Whether reading is held back by the cap now: more booked than a burst."""
        now = asyncio.get_running_loop().time()
        return self._rate_at(now) is not None and self._paid_until - now > BURST_S

    async def take(self, n: int) -> None:
        """Book ``n`` bytes just read; wait while reading has run ahead of the cap."""
        now = asyncio.get_running_loop().time()
        rate = self._rate_at(now)
        if rate is None:
            return
        self._paid_until = max(self._paid_until, now) + n / rate
        ahead = self._paid_until - now - BURST_S
        if ahead > 0:
            await asyncio.sleep(ahead)
