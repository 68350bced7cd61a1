"""sd_notify, spoken directly to $NOTIFY_SOCKET: no native dependency.

READY=1 once the daemon serves, STATUS= a one-line summary, WATCHDOG=1 from the event
loop itself (so a wedged loop stops the pings and systemd restarts the service),
RELOADING=1 then READY=1 around a reload (SIGHUP), and STOPPING=1 when it drains.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("blobferry.systemd")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str) -> None:
        if self._sock is None:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self._address)
        except OSError as e:
            log.warning("systemd notify failed", error=str(e))

    def ready(self, status: str) -> None:
        self.notify(ready="1", status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC tells systemd which reload this is (it is required with
        # Type=notify-reload, and harmless with Type=notify).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(reloading="1", monotonic_usec=str(usec), status="reloading settings")

    def stopping(self, status: str) -> None:
        self.notify(stopping="1", status=status)

    async def keepalive(self, status: Callable[[], str], every: float = 5.0) -> None:
        """Ping the watchdog (when WatchdogSec is set) and refresh STATUS, until cancelled."""
        if self._sock is None:
            return
        interval = min(every, self.watchdog_interval or every)
        while True:
            if self.watchdog_interval is not None:
                self.notify(watchdog="1", status=status())
            else:
                self.notify(status=status())
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
