"""How far this machine's clock is from a service's, read from an answer's Date header.

S3 and Azure both refuse a request signed more than 15 minutes off their own time, and
name a credential or an expired URL as the cause, or (a HEAD) nothing at all. A machine
whose clock has drifted (NTP stopped, a restored snapshot) then fails every request,
and a person checks keys that are fine. Every answer carries the service's Date, so a
refusal can say what is really wrong.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from daemon.errors import PermanentError

SKEW_LIMIT_S = 300.0  # NTP keeps a clock within milliseconds: 5 minutes is a broken one


def skew(date: str | None, now: float | None = None) -> float | None:
    """The service's clock minus ours, in seconds, from its ``Date`` header."""
    if not date:
        return None
    try:
        theirs = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return theirs - (time.time() if now is None else now)


def _span(seconds: float) -> str:
    if seconds < 7200:
        return f"{round(seconds / 60)} minutes"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


class ClockSkewError(PermanentError):
    def __init__(self, where: str, service: str, seconds: float) -> None:
        side = "behind" if seconds > 0 else "ahead of"
        super().__init__(
            f"{where}: {service} refused the request, and this machine's clock is "
            f"{_span(abs(seconds))} {side} {service}'s; {service} refuses requests signed "
            "more than 15 minutes off its own time. Set the clock right (chrony or "
            "another NTP client) and submit the job again; the credentials may be fine"
        )


def refused_for_time(where: str, service: str, date: str | None) -> ClockSkewError | None:
    """For a refused request (401, 403, 400): the clock as its cause, when it is off."""
    s = skew(date)
    if s is None or abs(s) < SKEW_LIMIT_S:
        return None
    return ClockSkewError(where, service, s)
