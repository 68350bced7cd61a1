"""How far away a service is: the fastest recent round trip of a small request to it.

A HEAD carries no payload, so its duration is the link's round trip plus the service's
own reaction time. The minimum over the last minute filters out the moments when this
process's event loop was busy; an old figure is dropped, so a link that moved is
measured again. The minimum filters only when there is more than one figure: a verdict
that a service is far is therefore not taken on fewer than ``FAR_AFTER`` of them (the
pipe asks again, see ``routes/pipe.near``). The first answer a client gets is no figure
at all: it pays for the connection and the library's first-call setup (botocore's
first HEAD takes 35-50 ms here, on s3rver and moto, the next ones 3-7 ms): counted,
it and two late answers made a near link far.
"""

from __future__ import annotations

import time
from collections import deque

# Round trips a "far" verdict rests on. On a loaded machine one answer in a few is late
# (a garbage collection, the event loop busy, the other core taken), and a near link
# judged far loses the pipe for a whole object; a far one costs two more round trips.
FAR_AFTER = 3


class RoundTrips:
    def __init__(self, window_s: float = 60.0, keep: int = 32) -> None:
        self._window = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)
        self._cold = True  # no answer yet: the first is not the link's

    def record(self, seconds: float) -> None:
        if self._cold:
            self._cold = False
            return
        self._samples.append((time.monotonic(), seconds))

    def near(self, within: float) -> bool | None:
        """Whether the service answers within ``within`` seconds: True on one fast
        round trip in the window, False on ``FAR_AFTER`` slow ones and none fast, None
        while too few have been seen to tell."""
        since = time.monotonic() - self._window
        recent = [s for t, s in self._samples if t >= since]
        if recent and min(recent) <= within:
            return True
        return False if len(recent) >= FAR_AFTER else None
