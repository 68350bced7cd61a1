"""The watched folder: a job dropped at any moment is claimed at once, not at the next
poll (30 s here, so a miss cannot pass for a slow machine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.sources.directory import DirectorySource


async def test_a_job_dropped_just_after_the_first_scan_is_seen_by_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = DirectorySource(tmp_path, poll_interval_s=30.0)
    scanned = source._waiting
    dropped = False

    def scan_then_drop(folder: Path) -> list[tuple[float, str]]:
        # The job arrives right after the first scan of the inbox found nothing: only
        # the inotify watch can report it before the next poll.
        nonlocal dropped
        found = scanned(folder)
        if folder == source.inbox and not dropped:
            dropped = True
            (folder / ".j.tmp").write_text("{}")
            (folder / ".j.tmp").rename(folder / "j.json")
        return found

    monkeypatch.setattr(source, "_waiting", scan_then_drop)
    stop = asyncio.Event()
    claims = source.jobs(stop)
    try:
        job = await asyncio.wait_for(anext(claims), 10)
    finally:
        stop.set()
        await claims.aclose()  # type: ignore[attr-defined]
    assert dropped and job.name == "j.json"
