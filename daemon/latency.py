"""How far away a service is: the fastest recent round trip of a small request to it.

A HEAD carries no payload, so its duration is the link's round trip plus the service's
own reaction time. The minimum over the last minute filters out the moments when this
process's event loop was busy; an old figure is dropped, so a link that moved is
measured again.
"""

from __future__ import annotations

import time
from collections import deque


class RoundTrips:
    def __init__(self, window_s: float = 60.0, keep: int = 32) -> None:
        self._window = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)

    def record(self, seconds: float) -> None:
        self._samples.append((time.monotonic(), seconds))

    def best(self) -> float | None:
        """The fastest round trip seen in the window, in seconds; None when none."""
        since = time.monotonic() - self._window
        recent = [s for t, s in self._samples if t >= since]
        return min(recent) if recent else None
