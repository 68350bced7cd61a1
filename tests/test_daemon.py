"""The daemon in this process: jobs dropped into the inbox, reports in done/ and failed/."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from structlog.testing import capture_logs

from daemon import app
from daemon.addresses import S3Address
from daemon.errors import ConfigError
from daemon.jobs import TransferSpec
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.state import _SCHEMA, StateStore
from daemon.transfer import Copier
from tests.conftest import AZURITE_KEY, make_settings, running_daemon
from tests.helpers import MiB, blob_bytes, blob_names, copy, payload
from tests.proxy import FaultProxy, Faults
from tests.test_faults import through


def job(source: str, destination: str, **extra: Any) -> str:
    return json.dumps({"source": source, "destination": destination, **extra})


def transfers(*pairs: tuple[str, str]) -> str:
    """A job of several transfers, each a (source, destination) pair."""
    return json.dumps({"transfers": [{"source": s, "destination": d} for s, d in pairs]})


async def test_thirty_jobs_dropped_at_once(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    for i in range(30):
        size = 9 * MiB if i % 10 == 0 else 1000 + i
        s3_client.put_object(Bucket=bucket, Key=f"in/{i}.bin", Body=payload(size, seed=i))
    async with running_daemon(settings) as d:
        for i in range(30):
            (d.inbox / f".job-{i}.json.tmp").write_text(
                job(f"s3://{bucket}/in/{i}.bin", f"az://{container}/out/{i}.bin")
            )
        for i in range(30):  # the renames land together
            os.rename(d.inbox / f".job-{i}.json.tmp", d.inbox / f"job-{i}.json")
        results = await asyncio.gather(*(d.wait_finished(f"job-{i}.json") for i in range(30)))
    for i, (folder, report) in enumerate(results):
        assert folder == "done", report
        assert report["job"] == f"job-{i}.json" and report["status"] == "done"
        assert report["started_at"] <= report["finished_at"]
        [t] = report["transfers"]
        assert t["status"] == "copied" and t["seconds"] >= 0
        assert t["source"] == f"s3://{bucket}/in/{i}.bin"
        size = 9 * MiB if i % 10 == 0 else 1000 + i
        assert t["bytes"] == size
        assert blob_bytes(blob_service, container, f"out/{i}.bin") == payload(size, seed=i)
    assert os.listdir(settings.jobs_dir / "processing") == []


async def test_startup_pickup_and_ignored_names(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="a", Body=b"aaa")
    inbox = settings.jobs_dir / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "early.json").write_text(job(f"s3://{bucket}/a", f"az://{container}/early"))
    for ignored in (".hidden.json", "writing.json.tmp", "upload.part"):
        (inbox / ignored).write_text(job(f"s3://{bucket}/a", f"az://{container}/{ignored}"))
    async with running_daemon(settings) as d:
        folder, _ = await d.wait_finished("early.json")
        assert folder == "done"
        d.drop("late.json", job(f"s3://{bucket}/a", f"az://{container}/late"))
        t0 = asyncio.get_running_loop().time()
        folder, _ = await d.wait_finished("late.json", timeout=10)
        assert folder == "done" and asyncio.get_running_loop().time() - t0 < 5
    assert blob_names(blob_service, container) == ["early", "late"]
    assert sorted(os.listdir(inbox)) == [".hidden.json", "upload.part", "writing.json.tmp"]


async def test_every_bad_input_fails_alone(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    tmp_path: Path,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="good.bin", Body=payload(9 * MiB))
    s3_client.put_object(Bucket=bucket, Key="small.bin", Body=b"small")
    outside = tmp_path / "outside.json"
    outside.write_text(job(f"s3://{bucket}/small.bin", f"az://{container}/via-link"))
    bad = {
        "malformed.json": ('{"source": "s3://x', "not valid JSON"),
        "unknown-field.json": (
            job(f"s3://{bucket}/good.bin", f"az://{container}/u", speed=9),
            "speed: unknown field",
        ),
        "bad-address.json": (
            job(f"gs://{bucket}/good.bin", f"az://{container}/b"),
            "must start with s3://",
        ),
        "empty-list.json": ('{"transfers": []}', "transfers"),
        "no-bucket.json": (
            job("s3://no-such-bucket-x/k", f"az://{container}/nb"),
            "does not exist",
        ),
        "no-key.json": (job(f"s3://{bucket}/nope.bin", f"az://{container}/nk"), "no such key"),
        "no-container.json": (
            job(f"s3://{bucket}/good.bin", "az://no-such-ctr/g"),
            "container 'no-such-ctr' does not exist",
        ),
        "deep.json": ("[" * 50_000 + "]" * 50_000, "JSON"),
    }
    async with running_daemon(settings) as d:
        for name, (text, _) in bad.items():
            d.drop(name, text)
        (d.inbox / "link.json").symlink_to(outside)
        d.drop("good.json", job(f"s3://{bucket}/good.bin", f"az://{container}/good.bin"))
        for name, (_, reason) in bad.items():
            folder, report = await d.wait_finished(name)
            assert folder == "failed", (name, report)
            errors = [report.get("error", "")] + [t.get("error", "") for t in report["transfers"]]
            assert any(reason in e for e in errors), (name, report)
        folder, report = await d.wait_finished("link.json")
        assert folder == "failed" and "symbolic link" in report["error"]
        folder, _ = await d.wait_finished("good.json")
        assert folder == "done"
        # Still serving after all that.
        d.drop("after.json", job(f"s3://{bucket}/small.bin", f"az://{container}/after"))
        assert (await d.wait_finished("after.json"))[0] == "done"
    assert blob_names(blob_service, container) == ["after", "good.bin"]
    assert blob_bytes(blob_service, container, "good.bin") == payload(9 * MiB)
    assert outside.exists()


async def test_wrong_azure_credential_fails_the_job_with_a_reason(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    wrong_key = AZURITE_KEY[:-8] + "AAAAAA=="
    settings = make_settings(
        tmp_path,
        moto_endpoint,
        azurite_endpoint,
        azure={
            "connection_string": (
                f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={wrong_key};"
                f"BlobEndpoint={azurite_endpoint}/devstoreaccount1;"
            )
        },
    )
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=payload(9 * MiB))
    s3_client.put_object(Bucket=bucket, Key="small.bin", Body=b"x")
    async with running_daemon(settings) as d:
        d.drop(
            "j.json",
            transfers(
                (f"s3://{bucket}/big.bin", f"az://{container}/big"),
                (f"s3://{bucket}/small.bin", f"az://{container}/small"),
            ),
        )
        folder, report = await d.wait_finished("j.json")
    assert folder == "failed"
    for t in report["transfers"]:
        assert "Azure refused the credentials" in t["error"]
        assert wrong_key not in t["error"]
    assert blob_names(blob_service, container) == []
    text = (settings.jobs_dir / "failed" / "j.report.json").read_text()
    assert wrong_key not in text


async def test_a_job_that_cannot_be_filed_waits_in_processing(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Filing a finished job can fail (a full disk, a folder where its report goes).
    The daemon goes on serving; the job stays in processing/ and is filed next start."""
    s3_client.put_object(Bucket=bucket, Key="a", Body=b"aaa")
    squat = settings.jobs_dir / "done" / "squat.report.json"
    (squat / "inside").mkdir(parents=True)  # no file can replace a folder that holds one
    processing = settings.jobs_dir / "processing"
    async with running_daemon(settings) as d:
        d.drop("squat.json", job(f"s3://{bucket}/a", f"az://{container}/squat"))
        deadline = asyncio.get_running_loop().time() + 30
        while blob_names(blob_service, container) != ["squat"]:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        d.drop("after.json", job(f"s3://{bucket}/a", f"az://{container}/after"))
        assert (await d.wait_finished("after.json"))[0] == "done"
        assert not d.task.done()
    assert os.listdir(processing) == ["squat.json"]
    assert sorted(os.listdir(settings.jobs_dir / "done")) == [
        "after.json",
        "after.report.json",
        "squat.report.json",  # still the folder; no half-written report beside it
    ]
    squat.joinpath("inside").rmdir()
    squat.rmdir()
    async with running_daemon(settings) as d:
        folder, report = await d.wait_finished("squat.json")
    assert folder == "done" and report["status"] == "done", report
    [t] = report["transfers"]
    assert t["status"] == "skipped", t  # the blob landed the first time
    assert os.listdir(processing) == []


def chattr(flag: str, path: Path) -> bool:
    """Set or clear a file attribute (+i: immutable); whether that worked here."""
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


async def test_a_job_file_that_cannot_be_moved_is_named_once_and_left(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A job file the daemon may not move out of inbox/ (another user's file in a sticky
    inbox, say; here an immutable one, which not even root may move) is logged once,
    with what to fix, and left where it is. It used to stop the daemon."""
    s3_client.put_object(Bucket=bucket, Key="a", Body=b"aaa")
    inbox = settings.jobs_dir / "inbox"
    inbox.mkdir(parents=True)
    stuck = inbox / "stuck.json"
    stuck.write_text(job(f"s3://{bucket}/a", f"az://{container}/stuck"))
    if not chattr("+i", stuck):
        pytest.skip("chattr +i is not available on this machine")
    try:
        with capture_logs() as logs:
            async with running_daemon(settings) as d:
                d.drop("after.json", job(f"s3://{bucket}/a", f"az://{container}/after"))
                assert (await d.wait_finished("after.json"))[0] == "done"
                await asyncio.sleep(1.0)  # five more scans of the inbox
        refused = [e for e in logs if e["event"] == "job file cannot be claimed, left in inbox/"]
        assert [e["job"] for e in refused] == ["stuck.json"]
        assert refused[0]["error"] == "Operation not permitted"
        assert stuck.exists() and blob_names(blob_service, container) == ["after"]
    finally:
        assert chattr("-i", stuck)


async def test_a_bug_costs_one_job_or_one_transfer_never_the_daemon(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No real fault reaches these branches (every known one is a TransferError), so a
    bug is planted: in the listing of one job's prefix, and in the copy of one object."""
    for key in ("list-me/x", "ok", "buggy"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    pages, copy = S3Reader.pages, Copier.copy

    def planted_pages(self: S3Reader, prefix: S3Address, *a: Any, **k: Any) -> Any:
        if prefix.key == "list-me/":
            raise RuntimeError("planted in the listing")
        return pages(self, prefix, *a, **k)

    async def planted_copy(self: Copier, spec: TransferSpec, *a: Any, **k: Any) -> Any:
        if spec.source.key == "buggy":
            raise RuntimeError("planted in the copy")
        return await copy(self, spec, *a, **k)

    monkeypatch.setattr(S3Reader, "pages", planted_pages)
    monkeypatch.setattr(Copier, "copy", planted_copy)
    async with running_daemon(settings) as d:
        d.drop("listing.json", job(f"s3://{bucket}/list-me/", f"az://{container}/l/"))
        d.drop(
            "mixed.json",
            transfers(
                (f"s3://{bucket}/ok", f"az://{container}/ok"),
                (f"s3://{bucket}/buggy", f"az://{container}/buggy"),
            ),
        )
        folder, report = await d.wait_finished("listing.json")
        assert folder == "failed"
        assert report["error"] == "internal error: RuntimeError: planted in the listing"
        folder, report = await d.wait_finished("mixed.json")
        assert folder == "failed"
        by_key = {t["source"].rsplit("/", 1)[1]: t for t in report["transfers"]}
        assert by_key["ok"]["status"] == "copied"
        assert by_key["buggy"]["status"] == "failed"
        assert by_key["buggy"]["error"] == "internal error: RuntimeError: planted in the copy"
        d.drop("after.json", job(f"s3://{bucket}/ok", f"az://{container}/after"))
        assert (await d.wait_finished("after.json"))[0] == "done"
    assert blob_names(blob_service, container) == ["after", "ok"]


async def test_one_daemon_per_state_folder_and_per_jobs_folder(
    settings: Settings, s3_client: Any, bucket: str, container: str, tmp_path: Path
) -> None:
    """A second daemon on either folder would recover the first one's jobs from
    processing/ and copy them twice: it stops at start with the setting named."""
    s3_client.put_object(Bucket=bucket, Key="a", Body=b"aaa")
    same_state = settings.model_copy(update={"jobs_dir": tmp_path / "other-jobs"})
    same_jobs = settings.model_copy(update={"state_dir": tmp_path / "other-state"})
    async with running_daemon(settings) as d:
        for second, setting in ((same_state, "state_dir"), (same_jobs, "jobs_dir")):
            with pytest.raises(ConfigError, match=f"{setting}: another blobferry daemon"):
                await asyncio.wait_for(app.serve(second, asyncio.Event()), 10)
        d.drop("j.json", job(f"s3://{bucket}/a", f"az://{container}/a"))
        assert (await d.wait_finished("j.json"))[0] == "done"
    # Both locks are let go at stop, including by the daemon that was refused.
    async with running_daemon(same_jobs) as d:
        d.drop("k.json", job(f"s3://{bucket}/a", f"az://{container}/k"))
        assert (await d.wait_finished("k.json"))[0] == "done"
    # One folder for both is a setup of its own, not a second daemon.
    one = tmp_path / "one-folder"
    async with running_daemon(settings.model_copy(update={"state_dir": one, "jobs_dir": one})) as d:
        d.drop("m.json", job(f"s3://{bucket}/a", f"az://{container}/m"))
        assert (await d.wait_finished("m.json"))[0] == "done"


async def test_two_jobs_writing_one_blob_take_turns(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A commit drops every block of the blob it does not list: two transfers writing
    one blob at once used to fail one of them with Azure's InvalidBlockList."""
    bodies = {k: payload(9 * MiB, seed=n) for n, k in enumerate(("a", "b"))}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    async with running_daemon(settings) as d:
        for key in bodies:
            (d.inbox / f".{key}.tmp").write_text(
                job(f"s3://{bucket}/{key}", f"az://{container}/same", overwrite="always")
            )
        for key in bodies:  # the renames land together
            os.rename(d.inbox / f".{key}.tmp", d.inbox / f"{key}.json")
        results = await asyncio.gather(*(d.wait_finished(f"{k}.json") for k in bodies))
    for folder, report in results:
        assert folder == "done", report
    # Whole, not a mix of the two: the one that committed last.
    last = max(results, key=lambda r: r[1]["finished_at"])[1]["job"].removesuffix(".json")
    assert blob_bytes(blob_service, container, "same") == bodies[last]


async def test_a_job_named_as_one_still_running_waits_its_turn(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """The same job file dropped again (a nightly.json) while the last one still runs.
    Claiming it replaced the running job's file in processing/: the first job then
    filed the second's file and the second could not be filed at all. Now it waits in
    inbox/ until its namesake is filed, then runs."""
    body = payload(8 * MiB, seed=3)
    s3_client.put_object(Bucket=bucket, Key="k", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as slow:
        tuned = settings.model_copy(
            update={"s3": settings.s3.model_copy(update={"endpoint_url": slow.endpoint})}
        )
        with capture_logs() as logs:
            async with running_daemon(tuned) as d:
                d.drop("nightly.json", job(f"s3://{bucket}/k", f"az://{container}/first"))
                while not (d.settings.jobs_dir / "processing" / "nightly.json").exists():
                    await asyncio.sleep(0.02)
                d.drop("nightly.json", job(f"s3://{bucket}/k", f"az://{container}/second"))
                report: dict[str, Any] = {}
                while (
                    report.get("transfers", [{}])[0].get("destination", "").split("/")[-1]
                    != "second"
                ):
                    folder, report = await d.wait_finished("nightly.json")
                    assert folder == "done", report
                    await asyncio.sleep(0.05)
    events = [e["event"] for e in logs]
    assert not [e for e in events if e.startswith("job not filed")]
    assert os.listdir(settings.jobs_dir / "processing") == []
    assert os.listdir(settings.jobs_dir / "inbox") == []
    for name in ("first", "second"):
        assert blob_bytes(blob_service, container, name) == body
    assert events.count("job waits: one of the same name is still running") == 1


async def test_a_damaged_state_database_is_moved_aside_and_the_daemon_serves(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A state database SQLite cannot read (a damaged disk; here 8 KiB of noise) stopped
    the daemon at every start, telling to free space on its disk. It is a record, not
    what resuming needs: it is moved aside, named in a warning, and the daemon serves."""
    s3_client.put_object(Bucket=bucket, Key="a", Body=b"aaa")
    settings.state_dir.mkdir(parents=True)
    noise = b"\0" + os.urandom(8191)  # never SQLite's own header
    (settings.state_dir / "blobferry.sqlite3").write_bytes(noise)
    with capture_logs() as logs:
        async with running_daemon(settings) as d:
            d.drop("j.json", job(f"s3://{bucket}/a", f"az://{container}/a"))
            assert (await d.wait_finished("j.json"))[0] == "done"
    [aside] = settings.state_dir.glob("blobferry.sqlite3.damaged-*")
    assert aside.read_bytes() == noise
    [warned] = [e for e in logs if e["event"].startswith("state database damaged")]
    assert "not a database" in warned["error"] and warned["moved_to"] == str(aside)
    assert blob_bytes(blob_service, container, "a") == b"aaa"


async def test_a_job_file_removed_while_it_runs_does_not_hold_up_its_name(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Someone deletes processing/j.json while j runs. Its report is still filed, and a
    new j.json is taken: it used to wait in inbox/ until the daemon restarted, and the
    log said the first stayed in processing/, where nothing was."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=payload(8 * MiB))
    async with FaultProxy(moto_endpoint, Faults(rate_bps=2 * MiB)) as proxy:
        slow = through(settings, proxy)
        with capture_logs() as logs:
            async with running_daemon(slow) as d:
                d.drop("j.json", job(f"s3://{bucket}/k", f"az://{container}/first"))
                running = slow.jobs_dir / "processing" / "j.json"
                while proxy.bytes_down < MiB:
                    await asyncio.sleep(0.02)
                running.unlink()
                while not (slow.jobs_dir / "done" / "j.report.json").exists():
                    await asyncio.sleep(0.05)
                d.drop("j.json", job(f"s3://{bucket}/k", f"az://{container}/second"))
                folder, report = await d.wait_finished("j.json")
    assert folder == "done" and report["transfers"][0]["destination"].endswith("/second")
    assert blob_names(blob_service, container) == ["first", "second"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "job file was removed from processing/ while the job ran; its report is filed"
    ]


async def test_a_job_is_claimed_only_when_a_transfer_slot_is_free(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """With every slot busy, new jobs wait in inbox/ (where another daemon on the same
    folder, or a cancel, can still take them). The supervisor only peeked at a free
    slot before claiming, and the job it claimed took that slot later, once parsed: in
    between, the next job was claimed too, so a burst filled processing/ with up to
    twice max_transfers jobs."""
    body = payload(2 * MiB, seed=5)
    s3_client.put_object(Bucket=bucket, Key="k", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=2 * MiB)) as proxy:
        slow = through(settings, proxy, max_transfers=1)
        async with running_daemon(slow) as d:
            d.drop("a.json", job(f"s3://{bucket}/k", f"az://{container}/a"))
            while not (slow.jobs_dir / "processing" / "a.json").exists():
                await asyncio.sleep(0.02)
            d.drop("b.json", job(f"s3://{bucket}/k", f"az://{container}/b"))
            d.drop("c.json", job(f"s3://{bucket}/k", f"az://{container}/c"))
            while proxy.bytes_down < MiB:  # a is copying: its slot is taken
                await asyncio.sleep(0.02)
                assert os.listdir(slow.jobs_dir / "processing") == ["a.json"]
            assert sorted(os.listdir(d.inbox)) == ["b.json", "c.json"]
            for name in ("a.json", "b.json", "c.json"):
                assert (await d.wait_finished(name))[0] == "done"
    assert blob_names(blob_service, container) == ["a", "b", "c"]


async def test_jobs_older_than_keep_days_are_dropped_from_the_state(settings: Settings) -> None:
    """A daemon of months kept every job's record for ever: a database growing without
    end on an instance short of disk. Jobs finished more than keep_days ago go (with
    their transfers) at start and daily; recent ones, and one interrupted long ago
    that waits in processing/ to resume, stay."""
    settings.state_dir.mkdir(parents=True)
    db = settings.state_dir / "blobferry.sqlite3"
    state = StateStore(db)
    for name, status in (
        ("old.json", "done"),
        ("old-failed.json", "failed"),
        ("recent.json", "done"),
        ("waiting.json", None),
    ):
        state.job_started(name)
        state.transfer_started(name, 0, "s3://b/k", "az://c/k")
        if status is not None:
            state.transfer_finished(name, 0, "copied", 3)
            state.job_finished(name, status)
    state.close()
    long_ago = time.time() - 40 * 86400
    with sqlite3.connect(db) as raw:
        raw.execute(
            "UPDATE jobs SET started_at = ?, finished_at = ? WHERE job != 'recent.json'",
            (long_ago, long_ago),
        )
        raw.execute("UPDATE jobs SET finished_at = NULL WHERE job = 'waiting.json'")
    async with running_daemon(settings.model_copy(update={"keep_days": 30})):
        pass
    with sqlite3.connect(db) as raw:
        jobs = sorted(r[0] for r in raw.execute("SELECT job FROM jobs"))
        transfers = sorted(r[0] for r in raw.execute("SELECT job FROM transfers"))
    assert jobs == transfers == ["recent.json", "waiting.json"]


async def test_include_and_exclude_choose_a_prefixs_objects(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Only the chosen objects are read and copied; the report counts the others as
    excluded, and a prefix of which nothing is chosen fails saying so."""
    keys = ["a.csv", "b.csv.tmp", "2026/c.csv", "2026/_SUCCESS", "logs/d.csv", "logs/e.txt"]
    for i, key in enumerate(keys):
        s3_client.put_object(Bucket=bucket, Key=f"out/{key}", Body=payload(1000 + i, seed=i))
    async with (
        FaultProxy(settings.s3.endpoint_url or "") as proxy,
        running_daemon(through(settings, proxy)) as d,
    ):
        d.drop(
            "chosen.json",
            job(
                f"s3://{bucket}/out/",
                f"az://{container}/in/",
                include=["*.csv"],
                exclude=["/logs/**"],
            ),
        )
        folder, report = await d.wait_finished("chosen.json")
        d.drop(
            "none.json",
            job(f"s3://{bucket}/out/", f"az://{container}/none/", include=["*.parquet"]),
        )
        none_folder, none_report = await d.wait_finished("none.json")
    assert folder == "done", report
    assert report["summary"] | {"bytes": 0} == {
        "transfers": 2, "copied": 2, "skipped": 0, "failed": 0, "excluded": 4, "bytes": 0,
    }  # fmt: skip
    assert blob_names(blob_service, container) == ["in/2026/c.csv", "in/a.csv"]
    gets = [r for r in proxy.requests if r.startswith("GET ") and "list-type" not in r]
    assert len(gets) == 2 and all(".csv?" in r for r in gets), gets
    assert none_folder == "failed"
    assert none_report["summary"]["excluded"] == 6
    assert none_report["transfers"][0]["error"] == (
        f"none of the 6 objects under s3://{bucket}/out/ is chosen by the job's include "
        "and exclude; check the patterns"
    )


async def test_a_dry_run_decides_what_would_be_copied_and_writes_nothing(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Under a prefix: an object already copied is skipped as unchanged, new ones (one
    small, one of blocks) would be copied and say how many bytes, an archived one is
    skipped as archived (its HEAD says whether it is restored), an excluded one is left
    out. Not one object is read and no blob is written. One missing object fails as a
    copy would."""
    sizes = {"a.csv": 1000, "b.csv": 2000, "big.csv": 9 * MiB, "c.tmp": 10}
    for key, size in sizes.items():
        s3_client.put_object(Bucket=bucket, Key=f"out/{key}", Body=payload(size))
    s3_client.put_object(Bucket=bucket, Key="out/cold.csv", Body=b"x", StorageClass="GLACIER")
    status, _ = await copy(settings, f"s3://{bucket}/out/a.csv", f"az://{container}/in/a.csv")
    assert status == "done"
    async with FaultProxy(settings.s3.endpoint_url or "") as proxy:
        dry = through(settings, proxy)
        status, rows = await copy(
            dry, f"s3://{bucket}/out/", f"az://{container}/in/", include=["*.csv"], dry_run=True
        )
        missing, [gone] = await copy(
            dry, f"s3://{bucket}/out/gone.csv", f"az://{container}/gone.csv", dry_run=True
        )
    assert status == "done"
    by_key = {r.source.rsplit("/", 1)[1]: r for r in rows}
    assert sorted(by_key) == ["a.csv", "b.csv", "big.csv", "cold.csv"]
    assert {r.status for r in rows} == {"skipped"}
    assert by_key["a.csv"].detail["note"].startswith("unchanged")
    for key in ("b.csv", "big.csv"):
        assert by_key[key].detail == {"note": "dry run: would be copied", "would_copy": sizes[key]}
    assert "archived" in by_key["cold.csv"].detail["note"]
    assert (missing, gone.status) == ("failed", "failed") and "no such key" in (gone.error or "")
    assert blob_names(blob_service, container) == ["in/a.csv"]
    reads = [r for r in proxy.requests if r.startswith("GET ") and "list-type" not in r]
    assert reads == [], reads
    heads = sorted(
        r.split("?")[0] for r in proxy.requests if r.startswith("HEAD /") and "/out/" in r
    )
    assert heads == [f"HEAD /{bucket}/out/cold.csv", f"HEAD /{bucket}/out/gone.csv"], heads


def test_a_state_database_from_before_new_columns_is_read_and_brought_up_to_date(
    tmp_path: Path,
) -> None:
    """`blobferry status` reads an older database as it is (no jobs.excluded, no
    transfers.bytes_reused); the daemon adds the columns."""
    path = tmp_path / "blobferry.sqlite3"
    old_schema = _SCHEMA.replace(",\n    excluded INTEGER NOT NULL DEFAULT 0", "").replace(
        "\n    bytes_reused INTEGER NOT NULL DEFAULT 0,", ""
    )
    assert old_schema.count("DEFAULT 0") == _SCHEMA.count("DEFAULT 0") - 2
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs VALUES ('old.json', 'done', 1.0, 2.0, NULL)")
        db.execute(
            "INSERT INTO transfers VALUES "
            "('old.json', 0, 's3://b/k', 'az://c/k', 'copied', 8, 8, 1.0, 2.0, 2.0, NULL, NULL)"
        )
    db.close()
    reader = StateStore(path, read_only=True)
    [row] = reader.jobs()
    assert (row.job, row.status, row.excluded) == ("old.json", "done", 0)
    [t] = reader.transfers("old.json")
    assert (t.bytes_done, t.bytes_reused, t.rate) == (8, 0, 8.0)
    reader.close()
    store = StateStore(path)
    store.job_started("new.json")
    store.transfer_started("new.json", 0, "s3://b/k", "az://c/k")
    store.transfer_progress("new.json", 0, 6, 8, reused=4)
    store.job_finished("new.json", "done", excluded=3)
    assert {r.job: r.excluded for r in store.jobs()} == {"old.json": 0, "new.json": 3}
    [t] = store.transfers("new.json")
    assert (t.bytes_done, t.bytes_reused) == (6, 4)
    store.close()
