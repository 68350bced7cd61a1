"""Retries in one place: exponential backoff with "equal" jitter, a bounded number of tries.

This is the only retry layer: botocore's own retries and the Azure SDK's are turned
off (``total_max_attempts: 1``, ``retry_total: 0``), so a request is tried at most
``retry.attempts`` times in all. Only RetryableError is retried; anything else
propagates at once. The caller passes a function that performs the whole step again
(for a block: presign, read, stage), so a retry never reuses a URL or a connection
that has already failed.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from daemon.errors import RetriesExhaustedError, RetryableError
from daemon.service_settings import RetrySettings

T = TypeVar("T")
log = structlog.get_logger("blobferry.retry")

# Retries since the process started, by step (the first word of ``what``: read, stage,
# HEAD, LIST ...), for /metrics: a flaky link shows here before it fails a transfer.
RETRIES: Counter[str] = Counter()


def backoff(policy: RetrySettings, attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1``: "equal" jitter, uniform between half
    the cap and the cap, the cap doubling from backoff_s up to backoff_max_s. Never
    less than half: tries that failed together do not all come back at once."""
    cap = min(policy.backoff_max_s, policy.backoff_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)


async def retrying(fn: Callable[[], Awaitable[T]], policy: RetrySettings, what: str) -> T:
    attempt = 1
    while True:
        try:
            return await fn()
        except RetryableError as e:
            if attempt >= policy.attempts:
                raise RetriesExhaustedError(what, attempt, e) from None
            delay = backoff(policy, attempt)
            RETRIES[what.split(" ", 1)[0].lower()] += 1
            log.warning(
                "retrying", what=what, attempt=attempt, error=str(e), wait_s=round(delay, 2)
            )
            await asyncio.sleep(delay)
            attempt += 1
