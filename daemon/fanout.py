"""A prefix job taken from a queue, spread over the fleet: its prefixes are listed a page
at a time (include and exclude applied) and each page goes back on the queue as a job
of single objects, which any daemon may take. The job itself copies nothing; its
report says, per transfer, how many objects went out in how many pages, and the
pages' reports are filed beside it (results.py), so one place shows the whole job.

The listing is not resumed: a daemon that dies while listing leaves its message to
come back, and the daemon that takes it lists again. Pages sent twice cost a look at
each blob, which finds it copied, and skips it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import aclosing

import structlog

from daemon.errors import TransferError, redact
from daemon.jobrun import Tally
from daemon.jobs import TransferSpec
from daemon.outcome import Status
from daemon.s3 import S3Reader
from daemon.sources.base import Spreader
from daemon.state import StateStore

log = structlog.get_logger("blobferry.fanout")


async def spread(
    job: str,
    specs: Sequence[TransferSpec],
    s3: S3Reader,
    state: StateStore,
    pages: Spreader,
    stop: asyncio.Event,
) -> Tally:
    """Put ``specs`` back on the queue as pages; returns the job's tally (a listing
    cut short by ``stop`` counts as interrupted)."""
    tally = Tally()
    singles = [s for s in specs if not s.source.is_prefix]
    seq = 0
    if singles:
        state.transfer_started(job, seq, "(single objects)", "(as given)")
        await pages.put(singles, [0] * len(singles))
        detail: dict[str, object] = {"spread": {"objects": len(singles)}}
        state.transfer_finished(job, seq, Status.SPREAD, 0, None, detail)
        seq += 1
    for spec in specs:
        if not spec.source.is_prefix:
            continue
        state.transfer_started(job, seq, str(spec.source), str(spec.destination))
        try:
            objects, excluded = await _list(spec, s3, pages, stop)
        except TransferError as e:
            tally.failed += 1
            tally.transient += int(e.transient)
            state.transfer_finished(job, seq, Status.FAILED, 0, redact(str(e)))
            log.error("listing failed", source=str(spec.source), error=redact(str(e)))
        else:
            if stop.is_set():
                tally.interrupted += 1
                state.transfer_finished(job, seq, Status.INTERRUPTED, 0)
                return tally
            tally.excluded += excluded
            if not objects:
                why = (
                    f"none of the {excluded} objects under {spec.source} is chosen by the "
                    "job's include and exclude; check the patterns"
                    if excluded
                    else f"no objects under {spec.source}; check the prefix"
                )
                tally.failed += 1
                state.transfer_finished(job, seq, Status.FAILED, 0, why)
                seq += 1
                continue
            detail = {"spread": {"objects": objects, "excluded": excluded}}
            state.transfer_finished(job, seq, Status.SPREAD, 0, None, detail)
            log.info("spread over the fleet", source=str(spec.source), objects=objects)
        seq += 1
    return tally


async def _list(
    spec: TransferSpec, s3: S3Reader, pages: Spreader, stop: asyncio.Event
) -> tuple[int, int]:
    """(objects sent, objects left out by include and exclude)."""
    keys = spec.options.keys
    skip = len(spec.source.key)
    objects = excluded = 0
    async with aclosing(s3.pages(spec.source)) as listing:
        async for page in listing:
            if stop.is_set():
                break
            chosen = [o for o in page if keys is None or keys.admits(o.key[skip:])]
            excluded += len(page) - len(chosen)
            if chosen:
                await pages.put([spec.for_key(o.key) for o in chosen], [o.size for o in chosen])
                objects += len(chosen)
    return objects, excluded
