"""Two processes, one state folder: `blobferry copy` beside a daemon on the same state_dir.

SQLite lets one writer at a time. A transaction left open between flushes (while a
transfer stalls, for as long as it stalls) made the other process meet "database is
locked", reported as a full disk; the daemon, meeting it, drained and exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.errors import StateError
from daemon.state import BUSY_WAIT_S, StateStore
from tests.conftest import make_settings, running_daemon
from tests.helpers import MiB, blob_bytes, payload
from tests.proxy import FaultProxy, Faults
from tests.test_cli import env_for, run

HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


@contextlib.contextmanager
def _holding_the_lock(state_dir: Path, seconds: float) -> Iterator[None]:
    """Another process holds the database's write lock for ``seconds``."""
    db = str(state_dir / "blobferry.sqlite3")
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, db, str(seconds)], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield


def test_a_transfer_between_two_flushes_holds_no_lock(tmp_path: Path) -> None:
    daemon = StateStore.in_dir(tmp_path)
    daemon.job_started("big.json")
    daemon.transfer_started("big.json", 0, "s3://b/big", "az://c/big")
    daemon.transfer_progress("big.json", 0, 5 * MiB, 100 * MiB)  # no flush: mid-flight
    other = StateStore.in_dir(tmp_path)
    t0 = time.monotonic()
    other.job_started("small.json")
    other.job_finished("small.json", "done")
    assert time.monotonic() - t0 < 1.0
    assert daemon.flush()
    reader = StateStore(tmp_path / "blobferry.sqlite3", read_only=True)
    [row] = reader.transfers("big.json")
    assert (row.bytes_done, row.bytes_total) == (5 * MiB, 100 * MiB)
    job = reader.job("small.json")
    assert job is not None and job.status == "done"
    for store in (daemon, other, reader):
        store.close()


def test_a_lock_held_past_the_wait_delays_rows_and_stops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore.in_dir(tmp_path)
    store.job_started("a.json")
    with _holding_the_lock(tmp_path, 3 * BUSY_WAIT_S):
        t0 = time.monotonic()
        store.job_finished("a.json", "done")  # waits BUSY_WAIT_S, keeps the row, no raise
        assert BUSY_WAIT_S - 0.5 < time.monotonic() - t0 < BUSY_WAIT_S + 1.5
        assert not store.flush()
    assert store.flush()
    job = store.job("a.json")
    assert job is not None and job.status == "done"
    store.close()


def test_a_lock_at_start_says_so_and_blames_no_disk(tmp_path: Path) -> None:
    StateStore.in_dir(tmp_path).close()
    with _holding_the_lock(tmp_path, 2 * BUSY_WAIT_S), pytest.raises(StateError) as e:
        StateStore.in_dir(tmp_path)
    assert "locked by another process" in str(e.value)
    assert "free space" not in str(e.value)


async def test_copy_beside_a_daemon_whose_transfer_is_held_mid_flight(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """The daemon's transfer stalls half-way (S3 stops sending); `blobferry copy` on the
    same state_dir runs a job to the end meanwhile, and the daemon runs on."""
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=payload(6 * MiB))
    s3_client.put_object(Bucket=bucket, Key="small.bin", Body=b"small")
    async with FaultProxy(moto_endpoint, Faults(stall_every=1, stall_after=512 * 1024)) as held:
        settings = make_settings(
            tmp_path,
            held.endpoint,
            azurite_endpoint,
            block_size_mb=1,
            progress_interval_s=0.05,
            retry={"backoff_s": 0.05, "backoff_max_s": 0.5, "stall_timeout_s": 10},
        )
        async with running_daemon(settings) as d:
            d.drop(
                "big.json",
                json.dumps(
                    {"source": f"s3://{bucket}/big.bin", "destination": f"az://{container}/big.bin"}
                ),
            )
            deadline = time.monotonic() + 30
            while held.stalls == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert held.stalls > 0, "the transfer never got to its stall"
            await asyncio.sleep(0.5)  # progress recorded, not yet flushed: the old open transaction
            env = env_for(tmp_path, moto_endpoint, azurite_endpoint)
            done = await asyncio.to_thread(
                run, ["copy", f"s3://{bucket}/small.bin", f"az://{container}/small.bin"], env, 60
            )
            assert done.returncode == 0, done.stderr
            assert "locked" not in done.stderr
            assert not d.task.done(), "the daemon stopped"
            held.faults.stall_every = 0  # let the held transfer go on
            folder, report = await d.wait_finished("big.json", 90)
            assert folder == "done", report
    assert blob_bytes(blob_service, container, "small.bin") == b"small"
    assert blob_bytes(blob_service, container, "big.bin") == payload(6 * MiB)
