"""structlog as JSON lines on stdout, one line per state change.

Job, source and destination are bound as contextvars inside each job's and transfer's
own task (tasks copy the context when they are created), so every line a transfer
logs carries them without being passed around. A last processor redacts anything
that looks like a credential from every string value.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from daemon.errors import redact


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in event.items():
        if isinstance(v, str):
            event[k] = redact(v)
    return event


def configure(level: str = "info", json: bool = True, stream: TextIO | None = None) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=_filtering(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """A new level for every logger, the rest of the configuration kept (a reload)."""
    structlog.configure(wrapper_class=_filtering(level))


def _filtering(level: str) -> Any:
    return structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO))
