"""Prometheus metrics: what the supervisor counts, served as text on /metrics.

Off unless ``metrics_address`` is set. The counters live in one ``Metrics`` object the
supervisor updates as jobs and transfers end (the systemd STATUS line reads the same);
gauges (jobs waiting in the inbox, the memory budget) are read when scraped. No
client library: the text format is a few lines, and aiohttp, already here, serves it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from daemon import __version__
from daemon.errors import ConfigError
from daemon.outcome import JobStatus, Status
from daemon.progress import RecentRate
from daemon.retry import RETRIES
from daemon.settings import host_port

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATUSES = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)  # those filed
TRANSFER_STATUSES = (  # those ended
    Status.COPIED,
    Status.SKIPPED,
    Status.DELETED,
    Status.FAILED,
    Status.CANCELLED,
    Status.INTERRUPTED,
)


MESSAGE_EVENTS = ("received", "deleted", "released", "dead_lettered", "ignored")


@dataclass(slots=True)
class Metrics:
    # Ended, by status; every status present from the start, so a rate of each has a 0.
    jobs: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(JOB_STATUSES, 0)))
    transfers: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(TRANSFER_STATUSES, 0))
    )
    bytes_copied: int = 0  # the sizes of the objects copied
    bytes_streamed: int = 0  # every byte read and sent on, resent ones again
    transfers_running: int = 0
    started_at: float = field(default_factory=time.time)
    recent: RecentRate = field(default_factory=RecentRate)  # the screens' rate, too
    # The queue's messages (sqs): what became of those this daemon received.
    messages: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(MESSAGE_EVENTS, 0))
    )
    queue_lag_s: float = 0.0  # the oldest message of the last receive: its age then

    def streamed(self, n: int) -> None:
        if n > 0:  # a pipe that starts over hands back what it had counted: not here
            self.bytes_streamed += n
            self.recent.add(time.monotonic(), self.bytes_streamed)

    def throughput(self) -> float:
        """Bytes a second moved over the last few seconds (progress.RecentRate)."""
        return self.recent.rate(time.monotonic())

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """The text exposition format; ``gauges``: name -> (help, value), read now."""
        by_status = '{{status="{}"}}'.format
        families: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("build_info", "gauge", "Its version.", [(f'{{version="{__version__}"}}', 1)]),
            ("start_time_seconds", "gauge", "Its start, Unix time.", [("", self.started_at)]),
            (
                "jobs_total",
                "counter",
                f"Jobs filed since start, by status ({', '.join(JOB_STATUSES)}).",
                [(by_status(k), n) for k, n in sorted(self.jobs.items())],
            ),
            (
                "transfers_total",
                "counter",
                f"Transfers ended since start, by status ({', '.join(TRANSFER_STATUSES)}).",
                [(by_status(k), n) for k, n in sorted(self.transfers.items())],
            ),
            ("transfers_running", "gauge", "Transfers in flight.", [("", self.transfers_running)]),
            (
                "copied_bytes_total",
                "counter",
                "Sizes of the objects copied since start.",
                [("", self.bytes_copied)],
            ),
            (
                "streamed_bytes_total",
                "counter",
                "Bytes read from S3 and sent on to Azure since start, as they go (its rate "
                "is the throughput); bytes sent again after a failure count again.",
                [("", self.bytes_streamed)],
            ),
            (
                "queue_messages_total",
                "counter",
                "Queue messages since start: received, deleted (after their report), "
                "released (back to the queue), dead_lettered (released for the last time "
                "its redrive policy allows), ignored (asked for nothing, deleted).",
                [(f'{{event="{k}"}}', n) for k, n in sorted(self.messages.items())],
            ),
            (
                "queue_lag_seconds",
                "gauge",
                "Age of the oldest message of the last receive (from its SentTimestamp); "
                "0 when a receive found the queue empty.",
                [("", self.queue_lag_s)],
            ),
            (
                "retries_total",
                "counter",
                "Requests tried again since start, by step (read, stage, head, list ...).",
                [(f'{{step="{k}"}}', n) for k, n in sorted(RETRIES.items())],
            ),
        ]
        families += [(k, "gauge", h, [("", v)]) for k, (h, v) in gauges.items()]
        out: list[str] = []
        for name, kind, help_, samples in families:
            out.append(f"# HELP blobferry_{name} {help_}")
            out.append(f"# TYPE blobferry_{name} {kind}")
            out.extend(f"blobferry_{name}{labels} {value:.17g}" for labels, value in samples)
        return "\n".join(out) + "\n"


@asynccontextmanager
async def serving(
    address: str,
    metrics: Metrics,
    gauges: Callable[[], Mapping[str, tuple[str, float]]],
    unready: Callable[[], str | None] = lambda: None,
) -> AsyncIterator[None]:
    """Serve GET /metrics on ``address`` for as long as the block runs, and the health
    checks load balancers and orchestrators ask: /healthz (200 while the process serves
    and its event loop turns, as answering at all shows) and /readyz (200 while it can
    take work; 503 with the reason from ``unready`` otherwise). Both read flags only,
    so they answer at once whatever the daemon is doing."""
    from aiohttp import web  # the server half of aiohttp: loaded only when asked for

    async def scrape(_: object) -> web.Response:
        body = metrics.render(gauges()).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: object) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: object) -> web.Response:
        why = unready()
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = host_port(address)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            f"configuration error: metrics_address: cannot listen on {address}: "
            f"{os.strerror(e.errno) if e.errno else e}"
        ) from None
    try:
        yield
    finally:
        await runner.cleanup()
