"""Cancelling one job while the daemon serves the others: `blobferry cancel NAME`, or a
file NAME in jobs/cancel/."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from structlog.testing import capture_logs

from daemon import app
from daemon.jobs import parse_job
from daemon.settings import Settings
from daemon.supervisor import CANCELLED, Supervisor
from tests.conftest import connection_string, running_daemon
from tests.helpers import MiB, blob_bytes, blob_names, payload
from tests.proxy import FaultProxy, Faults
from tests.test_daemon import job
from tests.test_faults import through

BLOBFERRY = str(Path(sys.executable).parent / "blobferry")


async def blobferry(settings: Settings, azurite: str, *args: str) -> tuple[int, str, str]:
    """The console script, in a process of its own, on ``settings``' folders."""
    env = {
        "PATH": str(Path(sys.executable).parent),
        "BLOBFERRY_JOBS_DIR": str(settings.jobs_dir),
        "BLOBFERRY_STATE_DIR": str(settings.state_dir),
        "AZURE_STORAGE_CONNECTION_STRING": connection_string(azurite),
    }
    proc = await asyncio.create_subprocess_exec(
        BLOBFERRY, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def uncommitted(svc: BlobServiceClient, container: str, blob: str) -> int:
    try:
        _, staged = svc.get_blob_client(container, blob).get_block_list("uncommitted")
    except Exception:  # no block yet: Azurite answers 404
        return 0
    return len(staged)


async def test_a_running_job_is_cancelled_alone_and_resumes_when_submitted_again(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A job copying one object in 1 MiB blocks is cancelled from the command line
    while another job copies. Its blocks in flight are dropped and nothing is
    committed; the other job ends as if nothing happened, and the daemon takes new
    jobs. Submitted again, the cancelled job reuses the blocks it had staged."""
    big, other = payload(8 * MiB, seed=1), payload(4 * MiB, seed=2)
    s3_client.put_object(Bucket=bucket, Key="big", Body=big)
    s3_client.put_object(Bucket=bucket, Key="other", Body=other)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=1 * MiB)) as slow:
        tuned = through(slow_blocks(settings), slow)
        with capture_logs() as logs:
            async with running_daemon(tuned) as d:
                d.drop("big.json", job(f"s3://{bucket}/big", f"az://{container}/big"))
                d.drop("other.json", job(f"s3://{bucket}/other", f"az://{container}/other"))
                while uncommitted(blob_service, container, "big") < 2:
                    await asyncio.sleep(0.05)
                rc, out, err = await blobferry(tuned, azurite_endpoint, "cancel", "big")
                assert rc == 0, err
                report_path = tuned.jobs_dir / "failed" / "big.report.json"
                assert out == f"big.json: cancelled; report {report_path}\n"
                folder, report = await d.wait_finished("big.json")
                assert (folder, report["status"], report["error"]) == (
                    "failed",
                    "cancelled",
                    CANCELLED,
                )
                [t] = report["transfers"]
                assert t["status"] == "cancelled" and 0 < t["bytes"] < 8 * MiB
                # Nothing was committed: the blob does not exist; its blocks wait.
                assert "big" not in blob_names(blob_service, container)
                staged = uncommitted(blob_service, container, "big")
                assert staged >= 2
                assert (await d.wait_finished("other.json"))[0] == "done"
                d.drop("big.json", job(f"s3://{bucket}/big", f"az://{container}/big"))
                folder, again = await d.wait_finished("big.json")
                while again["status"] == "cancelled":  # the first report, not yet replaced
                    await asyncio.sleep(0.05)
                    folder, again = await d.wait_finished("big.json")
    assert folder == "done", again
    [t] = again["transfers"]
    assert t["status"] == "copied" and t["blocks_reused"] >= 2
    assert blob_bytes(blob_service, container, "big") == big
    assert blob_bytes(blob_service, container, "other") == other
    assert not list((tuned.jobs_dir / "cancel").iterdir())
    assert not list((tuned.jobs_dir / "processing").iterdir())
    events = [e["event"] for e in logs]
    assert events.count("cancelling") == 1 and events.count("job cancelled") == 1
    assert [e["job"] for e in logs if e["event"] == "cancelling"] == ["big.json"]
    assert not [e for e in logs if e["log_level"] == "error"]


def slow_blocks(settings: Settings) -> Settings:
    """Blocks (not one piped stream, which could not resume), two at a time."""
    return settings.model_copy(
        update={"pipe_max_mb": 0, "block_size_mb": 1, "block_concurrency": 2}
    )


async def test_a_waiting_job_is_filed_cancelled_without_running(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """With its one slot busy, the daemon leaves wait.json in inbox/. Cancelled there,
    it is filed at once, without a transfer; the running job is not disturbed. A
    cancel naming no job is said and taken away."""
    body = payload(3 * MiB, seed=4)
    s3_client.put_object(Bucket=bucket, Key="k", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=1 * MiB)) as slow:
        tuned = through(slow_blocks(settings), slow, max_transfers=1)
        with capture_logs() as logs:
            async with running_daemon(tuned) as d:
                d.drop("run.json", job(f"s3://{bucket}/k", f"az://{container}/run"))
                while not (tuned.jobs_dir / "processing" / "run.json").exists():
                    await asyncio.sleep(0.02)
                d.drop("wait.json", job(f"s3://{bucket}/k", f"az://{container}/wait"))
                await asyncio.sleep(0.3)
                assert (d.inbox / "wait.json").exists()  # no slot: not claimed
                (tuned.jobs_dir / "cancel" / "ghost.json").write_bytes(b"")
                (tuned.jobs_dir / "cancel" / "wait.json").write_bytes(b"")
                folder, report = await d.wait_finished("wait.json")
                assert not (tuned.jobs_dir / "done" / "run.json").exists()  # still running
                assert (await d.wait_finished("run.json"))[0] == "done"
    assert folder == "failed"
    assert report["status"] == "cancelled" and report["error"] == "cancelled before it started"
    assert report["transfers"] == []
    assert blob_names(blob_service, container) == ["run"]
    assert blob_bytes(blob_service, container, "run") == body
    assert not list((tuned.jobs_dir / "cancel").iterdir())
    [ghost] = [e for e in logs if e.get("job") == "ghost.json"]
    assert ghost["event"] == "nothing to cancel: no job of that name waits or runs"


async def test_cancel_asked_while_the_daemon_is_down_is_acted_on_at_start(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """`blobferry cancel` with no daemon running says the request waits, and exits 1;
    the daemon acts on it when it starts: the job left in processing/ by the last run
    is filed cancelled, not resumed. A job nobody knows is refused at once."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"kkk")
    for folder in ("processing", "inbox", "cancel"):
        (settings.jobs_dir / folder).mkdir(parents=True, exist_ok=True)
    left = settings.jobs_dir / "processing" / "left.json"
    left.write_text(job(f"s3://{bucket}/k", f"az://{container}/left"))
    rc, _, err = await blobferry(settings, azurite_endpoint, "cancel", "left", "--wait", "0.3")
    assert rc == 1 and "has not taken the request within 0.3 s (is it running?)" in err
    rc, _, err = await blobferry(settings, azurite_endpoint, "cancel", "nobody")
    assert rc == 1 and "no job named nobody waits or runs" in err
    async with running_daemon(settings) as d:
        folder, report = await d.wait_finished("left.json")
    assert (folder, report["status"]) == ("failed", "cancelled")
    assert blob_names(blob_service, container) == []
    assert json.loads((settings.jobs_dir / "failed" / "left.json").read_text())["source"]


@pytest.mark.parametrize(
    ("route", "size", "changes"),
    [
        ("blocks", 8 * MiB, {"pipe_max_mb": 0, "block_size_mb": 1, "block_concurrency": 4}),
        ("pipe", 8 * MiB, {"block_size_mb": 1, "pipe_max_mb": 64, "pipe_rtt_ms": 1000.0}),
        ("whole", 3 * MiB, {"block_size_mb": 4}),
    ],
)
async def test_a_cancelled_transfer_gives_back_its_memory_and_commits_nothing(
    route: str,
    size: int,
    changes: dict[str, Any],
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Cancelled mid-read on each route, a transfer hands back every byte of the memory
    budget it held (the daemon lives on after a cancel: a leak would shrink it for good)
    and leaves no blob; the same object then copies whole on the same engine."""
    body = payload(size, seed=6)
    s3_client.put_object(Bucket=bucket, Key="k", Body=body)
    [spec] = parse_job(job(f"s3://{bucket}/k", f"az://{container}/k"))
    async with FaultProxy(moto_endpoint, Faults(rate_bps=2 * MiB)) as slow:
        tuned = through(settings, slow, **changes)
        async with app.engine(tuned, asyncio.Event()) as e:
            copying = asyncio.create_task(e.copier.copy(spec, None, lambda n: None))
            while slow.bytes_down < MiB:
                await asyncio.sleep(0.01)
            assert e.budget.used > 0
            copying.cancel()
            with pytest.raises(asyncio.CancelledError):
                await copying
            assert e.budget.used == 0
            assert blob_names(blob_service, container) == []
            outcome = await e.copier.copy(spec, None, lambda n: None)
            assert outcome.route == route and e.budget.used == 0
    assert blob_bytes(blob_service, container, "k") == body


async def test_a_job_cancelled_as_its_slot_frees_gives_the_slot_back(settings: Settings) -> None:
    """A job waits for a transfer slot; the slot comes free and, in the same turn of
    the loop, the job is cancelled. The slot it had just been given was lost: one
    fewer object in flight for the daemon's whole life."""
    tuned = settings.model_copy(update={"max_transfers": 1})
    sup = Supervisor(tuned, None, None, None, asyncio.Event())  # type: ignore[arg-type]
    await sup._slots.acquire(1)  # a transfer holds the only slot
    waiting = asyncio.create_task(sup._wait_for_slot(peek=False))
    await asyncio.sleep(0)
    sup._slots.release(1)  # the transfer ends: the waiting job is handed the slot ...
    await asyncio.sleep(0)
    waiting.cancel()  # ... and cancelled before it saw it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sup._slots.used == 0


async def test_a_recovered_job_cancelled_before_its_turn_is_not_run_after_all(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Three jobs left in processing/ by a daemon that died, one slot, and a cancel for
    the last. It is filed cancelled at once; when its turn in the recovered list came,
    it was taken up again, found no file, and its report was replaced by a failure."""
    s3_client.put_object(Bucket=bucket, Key="slow", Body=payload(2 * MiB, seed=8))
    s3_client.put_object(Bucket=bucket, Key="small", Body=b"small")
    processing, cancel = settings.jobs_dir / "processing", settings.jobs_dir / "cancel"
    processing.mkdir(parents=True)
    cancel.mkdir()
    for name, key in (("r1.json", "slow"), ("r2.json", "small"), ("r3.json", "small")):
        (processing / name).write_text(job(f"s3://{bucket}/{key}", f"az://{container}/{name}"))
    (cancel / "r3.json").write_bytes(b"")
    async with FaultProxy(moto_endpoint, Faults(rate_bps=1 * MiB)) as slow:
        tuned = through(settings, slow, max_transfers=1)
        async with running_daemon(tuned) as d:
            assert (await d.wait_finished("r3.json"))[1]["status"] == "cancelled"
            assert (await d.wait_finished("r1.json"))[0] == "done"
            assert (await d.wait_finished("r2.json"))[0] == "done"
            await asyncio.sleep(0.3)  # r3's turn in the recovered list has come and gone
    report = json.loads((tuned.jobs_dir / "failed" / "r3.report.json").read_text())
    assert report["status"] == "cancelled" and report["error"] == "cancelled before it started"
    assert not (tuned.jobs_dir / "done" / "r3.json").exists()
    assert blob_names(blob_service, container) == ["r1.json", "r2.json"]
