"""SIGHUP (``systemctl reload blobferry``): read the settings again, apply what can change live.

The cap on bandwidth is why this exists: the service sharing the instance may need its
network back now, not after a restart, and a restart of a daemon moving a file of
hundreds of GB costs the blocks in flight. The same holds for its memory and for how
many transfers run at once. ``bandwidth_mb_s``, ``max_transfers``, ``memory_mb``, ``log_level`` and
``keep_days`` change at once, for running transfers too: a lower ``max_transfers`` or
``memory_mb`` stops admitting transfers or blocks until the load is under it, and
cancels nothing. Everything else (folders, endpoints, credentials, block sizes,
connection pools) is built into parts that live for the run: a change to it is named in
the log as waiting for a restart, and none of it applies, so the daemon never runs on
half of a new configuration.

A settings file that does not load changes nothing: the daemon logs why and runs on as it
was. The log names settings, never their values, which may be secrets. The environment
is the one the daemon started with (systemd reads ``EnvironmentFile=`` at start only), so
a reload reads the TOML file's changes.

Before this, SIGHUP had its default action: it killed the daemon on the spot, without
the drain SIGTERM gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from pydantic import BaseModel

from daemon.errors import ConfigError
from daemon.settings import Settings
from daemon.systemd import Notifier

log = structlog.get_logger("blobferry")

LIVE = ("bandwidth_mb_s", "max_transfers", "memory_mb", "log_level", "keep_days")


def changed(old: BaseModel, new: BaseModel, prefix: str = "") -> Iterator[str]:
    """The dotted names of the settings whose values differ, in declaration order."""
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            yield from changed(a, b, f"{prefix}{name}.")
        elif a != b:  # SecretStr compares its secrets
            yield prefix + name


def in_force(settings: Settings, name: str) -> object:
    """A live setting's value as the log shows it (a timetable in its own words)."""
    return settings.bandwidth.describe() if name == "bandwidth_mb_s" else getattr(settings, name)


@dataclass(slots=True)
class Reloader:
    """The trigger: the CLI's SIGHUP handler calls ``ask``; ``load`` reads the settings
    as the daemon was started to read them (the same --config, the same environment)."""

    load: Callable[[], Settings]
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    def ask(self) -> None:
        self.asked.set()

    async def serve(
        self,
        settings: Settings,
        apply: Callable[[Settings], None],
        notifier: Notifier,
        status: Callable[[], str],
    ) -> None:
        """Until cancelled: on each ask, load, log what changed, ``apply`` the settings
        now in force (those of the start with the live ones replaced)."""
        current = settings
        while True:
            await self.asked.wait()
            self.asked.clear()
            notifier.reloading()
            try:
                new = self.load()
            except ConfigError as e:
                log.error("settings not reloaded; running on as before", error=str(e))
            else:
                names = list(changed(current, new))
                live = [n for n in names if n in LIVE]
                current = current.model_copy(update={n: getattr(new, n) for n in live})
                # Logged before a new log_level could hide the line.
                log.info(
                    "settings reloaded",
                    applied=live,
                    after_restart=[n for n in names if n not in LIVE],
                    in_force={n: in_force(current, n) for n in LIVE},
                )
                apply(current)
            notifier.ready(status())
