"""Hostile job files: each gets a clear outcome, memory stays bounded, nothing else is disturbed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.errors import JobFileError
from daemon.settings import Settings
from daemon.sources.base import ClaimedJob
from daemon.sources.directory import DirectorySource
from tests.conftest import running_daemon
from tests.helpers import blob_bytes
from tests.test_faults import daemon_env, start_daemon, wait_report


def one(bucket: str, container: str, blob: str) -> str:
    return json.dumps({"source": f"s3://{bucket}/k", "destination": f"az://{container}/{blob}"})


async def test_oversized_half_written_and_oddly_named_job_files(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"payload")
    async with running_daemon(settings) as d:
        # 50 MB of otherwise valid JSON.
        padding = " " * (50 * 1024 * 1024)
        d.drop("huge.json", one(bucket, container, "huge")[:-1] + padding + "}")
        # Written in place, in two halves, with a pause: must not be read half-way.
        text = one(bucket, container, "slow")
        slow = d.inbox / "slow.json"
        with open(slow, "w") as f:
            f.write(text[:20])
            f.flush()
            await asyncio.sleep(0.3)
            f.write(text[20:])
        odd = ["wéird ☃ name (1) & $x;'.json", "-dash.json", "spa ce.json", "tab\there.json"]
        # Names a file system takes, too long to take ".report.json" too (255 bytes):
        # such a job could never be filed and ran again at every start.
        odd += ["n" * 245 + ".json", "ž" * 122 + ".json"]
        for i, name in enumerate(odd):
            d.drop(name, one(bucket, container, f"odd-{i}"))
        folder, report = await d.wait_finished("huge.json")
        assert folder == "failed" and "larger than 16 MiB" in report["error"]
        assert (await d.wait_finished("slow.json"))[0] == "done"
        for name in odd:
            folder, report = await d.wait_finished(name)
            assert folder == "done" and report["job"] == name
        names = [p.name for p in (settings.jobs_dir / "done").iterdir()]
        assert len(set(names)) == len(names) == 2 * (len(odd) + 1)  # each job, its report
    assert blob_bytes(blob_service, container, "slow") == b"payload"


async def test_a_hundred_thousand_transfers_stay_bounded_and_starve_no_one(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    tmp_path: Path,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"payload")
    big = {
        "transfers": [
            {"source": f"s3://{bucket}/k", "destination": f"az://{container}/big/{i}"}
            for i in range(100_000)
        ]
    }
    env = daemon_env(
        settings,
        moto_endpoint,
        azurite_endpoint,
        BLOBFERRY_LOG_LEVEL="warning",
        BLOBFERRY_MAX_TRANSFERS="8",
    )
    proc = await start_daemon(env)
    try:
        inbox = settings.jobs_dir / "inbox"
        while not inbox.exists():
            await asyncio.sleep(0.05)
        (tmp_path / "big.json").write_text(json.dumps(big))
        (tmp_path / "big.json").rename(inbox / "big.json")
        while not (settings.jobs_dir / "processing" / "big.json").exists():
            await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # parsed and well under way
        (inbox / "small.json").write_text(one(bucket, container, "small"))
        # Starved, it would wait behind 100,000 transfers (many minutes), not seconds.
        report = await wait_report(settings.jobs_dir, "small", timeout=60)
        assert report["folder"] == "done"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kib = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
        assert peak_kib < 300 * 1024, f"peak RSS {peak_kib} KiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    # Unfinished, so it waits in processing/ for the next start.
    assert (settings.jobs_dir / "processing" / "big.json").exists()
    assert blob_bytes(blob_service, container, "small") == b"payload"


async def test_a_fifo_a_link_and_a_folder_in_the_inbox_stall_nothing(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A FIFO's open() waits for a writer for ever: it blocked every later claim and
    the drain on SIGTERM, and again after a restart from processing/. Each of these is
    filed to failed/ with the reason; the jobs after them run; SIGTERM drains at once."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"payload")
    jobs = settings.jobs_dir
    for folder in ("inbox", "processing"):
        (jobs / folder).mkdir(parents=True)
    os.mkfifo(jobs / "processing" / "left-by-a-crash.json")  # recovered at start
    proc = await start_daemon(daemon_env(settings, moto_endpoint, azurite_endpoint))
    try:
        os.mkfifo(jobs / "inbox" / "fifo.json")
        os.mkfifo(jobs / "fifo-elsewhere")
        (jobs / "inbox" / "link.json").symlink_to(jobs / "fifo-elsewhere")
        (jobs / "inbox" / "folder.json").mkdir()
        await asyncio.sleep(0.5)
        (jobs / "inbox" / "after.json").write_text(one(bucket, container, "after"))
        assert (await wait_report(jobs, "after", timeout=30))["folder"] == "done"
        reasons = {
            "left-by-a-crash": "a FIFO",
            "fifo": "a FIFO",
            "link": "symbolic link",
            "folder": "a folder",
        }
        for name, reason in reasons.items():
            report = await wait_report(jobs, name, timeout=30)
            assert report["folder"] == "failed" and reason in report["error"], report
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert blob_bytes(blob_service, container, "after") == b"payload"


def test_a_job_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path, max_bytes=1 << 20)
    source.prepare()
    big = tmp_path / "processing" / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: reading it would take minutes and memory
    t0 = time.monotonic()
    with pytest.raises(JobFileError, match=r"larger than 1 MiB \(max_job_file_mb\)"):
        asyncio.run(source.read(ClaimedJob("big.json", big)))
    assert time.monotonic() - t0 < 1


PARSE_PEAK = """
import json, resource, sys
from daemon.jobs import parse_job
import daemon.app  # everything the daemon has loaded, in the baseline
raw = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(1 for _ in parse_job(raw))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, (peak - base) * 1024)
"""


def test_parsing_the_largest_job_file_costs_a_few_times_its_size(tmp_path: Path) -> None:
    """The worst case per byte: 16 MiB of the shortest transfers (270,000 of them).
    Parsed as a tree with a spec each, it took ~11x its size; read an item at a time,
    under 4x (the text, its decoded copy, and the offsets), as the README says."""
    items = [{"source": f"s3://bkt/{i}", "destination": f"az://ctr/{i}"} for i in range(270_000)]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"transfers": items}, separators=(",", ":")))
    size = job.stat().st_size
    assert 15 << 20 < size <= 16 << 20
    out = subprocess.run(
        [sys.executable, "-c", PARSE_PEAK, str(job)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    n, grew = map(int, out.stdout.split())
    assert n == 270_000
    assert grew < 4 * size, f"parsing grew RSS by {grew / size:.1f}x the file's size"
