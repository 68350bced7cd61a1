"""The watched folder: a job dropped at any moment is claimed at once, not at the next
poll (30 s here, so a miss cannot pass for a slow machine)."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from daemon import cli
from daemon.outcome import JobStatus
from daemon.sources.base import ClaimedJob, Ending
from daemon.sources.directory import DirectorySource
from daemon.state import StateStore
from tests.test_daemon import chattr


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
        await claims.aclose()
    assert dropped and job.name == "j.json"


def test_the_inbox_takes_jobs_from_other_users_of_the_daemons_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service that drops jobs runs as a user of its own. Under the unit's
    UMask=0027 the daemon made inbox/ 0750, which no other user could write; it is
    now 2770 (its group writes, and what is dropped there belongs to that group). A
    job that user submits with a strict umask (077) is still readable by the daemon.
    An inbox someone made already keeps the mode they gave it."""
    jobs = tmp_path / "jobs"
    old = os.umask(0o027)
    try:
        DirectorySource(jobs).prepare()
    finally:
        os.umask(0o077)
    try:
        monkeypatch.setenv("BLOBFERRY_JOBS_DIR", str(jobs))
        assert cli.main(["submit", "s3://bkt/k", "az://ctr/k"]) == 0
    finally:
        os.umask(old)
    for shared in ("inbox", "cancel"):  # whoever may drop a job may cancel one
        assert stat.S_IMODE((jobs / shared).stat().st_mode) == 0o2770
    for folder in ("processing", "done", "failed"):
        assert stat.S_IMODE((jobs / folder).stat().st_mode) == 0o750  # the umask's
    [job] = (jobs / "inbox").iterdir()
    assert job.name == capsys.readouterr().out.strip()
    assert stat.S_IMODE(job.stat().st_mode) == 0o644
    (jobs / "inbox").chmod(0o1733)  # a drop box its owner chose
    DirectorySource(jobs).prepare()
    assert stat.S_IMODE((jobs / "inbox").stat().st_mode) == 0o1733


def test_submit_says_why_it_cannot_put_a_job_in_the_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An inbox this user may not write (here an immutable one, which not even root may
    write) and a name no file system takes: one line and exit code 2, no traceback. A
    name of 250 characters goes: the temporary file no longer carries the name."""
    inbox = tmp_path / "jobs" / "inbox"
    inbox.mkdir(parents=True)
    monkeypatch.setenv("BLOBFERRY_JOBS_DIR", str(tmp_path / "jobs"))
    long = "n" * 250
    assert cli.main(["submit", "s3://bkt/k", "az://ctr/k", "--name", long]) == 0
    assert capsys.readouterr().out.strip() == f"{long}.json"
    assert cli.main(["submit", "s3://bkt/k", "az://ctr/k", "--name", long + "n"]) == 2
    assert "longer than a file name may be" in capsys.readouterr().err
    if not chattr("+i", inbox):
        pytest.skip("chattr +i is not available on this machine")
    try:
        assert cli.main(["submit", "s3://bkt/k", "az://ctr/k"]) == 2
    finally:
        assert chattr("-i", inbox)
    err = capsys.readouterr().err
    assert err.startswith(f"blobferry: cannot put a job into {inbox}: Operation not permitted")
    assert err.count("\n") == 1


async def test_a_job_is_filed_when_its_folder_was_removed_while_it_ran(tmp_path: Path) -> None:
    """done/ removed by hand while the daemon runs: the job is still filed (it stayed
    in processing/ until the next start, and held its name until then)."""
    source = DirectorySource(tmp_path / "jobs")
    source.prepare()
    (source.processing / "j.json").write_text("{}")
    job = ClaimedJob("j.json", source.processing / "j.json")
    (source.done).rmdir()
    await source.finish(job, Ending(JobStatus.DONE), lambda f: f.write('{"job": "j.json"}'))
    assert sorted(p.name for p in source.done.iterdir()) == ["j.json", "j.report.json"]


def test_status_reads_the_state_without_writing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`blobferry status` may run as a user of the daemon's group, who can read the
    database but not write it or make files beside it. It wrote a row at every open and
    failed there, telling to free space. Here the daemon's store is open (its -wal and
    -shm exist) and the folder, the database and its log are immutable (not even root
    may write them). The shared-memory index stays writable: made immutable, it killed
    the reader with SIGBUS, which a user who merely may not write it does not meet
    (checked by hand: user nobody reads such a database while its writer is open)."""
    state_dir = tmp_path / "state"
    store = StateStore.in_dir(state_dir)
    store.job_started("j.json")
    store.job_finished("j.json", "done")
    files = [state_dir, *(f for f in state_dir.iterdir() if not f.name.endswith("-shm"))]
    try:
        if not all(chattr("+i", f) for f in files):
            pytest.skip("chattr +i is not available on this machine")
        monkeypatch.setenv("BLOBFERRY_STATE_DIR", str(state_dir))
        code = cli.main(["status"])
    finally:
        for f in files:
            chattr("-i", f)
        store.close()
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("j.json") and " done " in out


async def test_the_waiting_count_is_read_without_listing_the_inbox(tmp_path: Path) -> None:
    """/metrics reads it at every scrape: listing 30,000 files there, on the event loop,
    took tens of milliseconds a scrape (a third of a second at 100,000)."""
    source = DirectorySource(tmp_path / "jobs", settle_s=0, watch=False)
    source.prepare()
    for i in range(30_000):
        (source.inbox / f"j{i:05d}.json").touch()
    stop = asyncio.Event()
    claims = source.jobs(stop)
    first = await anext(claims)
    assert first.name == "j00000.json"
    t0 = time.perf_counter()
    for _ in range(100):
        waiting = source.waiting()
    assert (time.perf_counter() - t0) / 100 < 0.001
    assert waiting == 29_999
    stop.set()
    await claims.aclose()
