"""The console script as a user runs it: separate processes, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient

from tests.conftest import connection_string
from tests.emulators import dies_with_this_process
from tests.helpers import MiB, blob_names, multipart_object

BLOBFERRY = str(Path(sys.executable).parent / "blobferry")
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(rc)"
)


def env_for(tmp_path: Path, moto: str, azurite: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BLOBFERRY_JOBS_DIR=str(tmp_path / "jobs"),
        BLOBFERRY_STATE_DIR=str(tmp_path / "state"),
        BLOBFERRY_S3__ENDPOINT_URL=moto,
        AZURE_STORAGE_CONNECTION_STRING=connection_string(azurite),
        BLOBFERRY_POLL_INTERVAL_S="0.2",
        **extra,
    )
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BLOBFERRY, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_copy_300_mib_with_bounded_memory(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    size = 300 * MiB
    # 10 MiB parts: a multipart source, as large uploads are.
    multipart_object(s3_client, bucket, "big.bin", size, 10 * MiB)
    env = env_for(tmp_path, moto_endpoint, azurite_endpoint)
    # The peak RSS of blobferry itself. A child forked from this test process would
    # inherit its high-water mark (it holds the payload), so a small wrapper process
    # runs the copy and reports its own child's peak.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS,
            BLOBFERRY,
            "copy",
            f"s3://{bucket}/big.bin",
            f"az://{container}/big.bin",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    [t] = report["transfers"]
    assert (t["status"], t["bytes"], t["verified"]) == ("copied", size, "multipart-etag")
    # ru_maxrss of children is the largest child so far; this copy must be it or under it.
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib} KiB"
    blob = blob_service.get_blob_client(container, "big.bin")
    assert blob.get_blob_properties().size == size
    got = blob.download_blob(max_concurrency=4).readall()
    want = s3_client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert got == want


def test_exit_codes_and_one_line_errors(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    env = env_for(tmp_path, moto_endpoint, azurite_endpoint)
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"data")
    ok = run(["copy", f"s3://{bucket}/k", f"az://{container}/k", "--quiet"], env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "done"
    missing = run(["copy", f"s3://{bucket}/missing", f"az://{container}/m"], env)
    assert missing.returncode == 1
    assert "no such key" in json.loads(missing.stdout)["transfers"][0]["error"]
    usage = run(["copy", "not-an-address", f"az://{container}/x"], env)
    assert usage.returncode == 2 and "must start with s3://" in usage.stderr
    for key in ("p/a.csv", "p/b.txt", "p/tmp/c.csv"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"data")
    chosen = ["--include", "*.csv", "--exclude", "tmp/**", "--quiet"]
    some = run(["copy", f"s3://{bucket}/p/", f"az://{container}/p/", *chosen], env)
    assert some.returncode == 0, some.stderr
    report = json.loads(some.stdout)
    assert [t["source"] for t in report["transfers"]] == [f"s3://{bucket}/p/a.csv"]
    assert report["summary"]["excluded"] == 2
    dry = run(["copy", f"s3://{bucket}/p/", f"az://{container}/q/", "--dry-run", "--quiet"], env)
    assert dry.returncode == 0, dry.stderr
    dry_report = json.loads(dry.stdout)
    assert [(t["note"], t["would_copy"]) for t in dry_report["transfers"]] == [
        ("dry run: would be copied", 4)
    ] * 3
    assert dry_report["summary"]["would_copy"] == {"objects": 3, "bytes": 12}
    assert "would_copy" not in report["summary"]  # a copy's report: nothing to add up
    listed = run(["status"], env)
    [line] = [line for line in listed.stdout.splitlines() if line.startswith(dry_report["job"])]
    assert "3 skipped (3 would be copied, 12 B)" in line
    one = run(["copy", f"s3://{bucket}/k", f"az://{container}/k", "--include", "*.csv"], env)
    assert one.returncode == 2 and "choose objects under a prefix" in one.stderr
    bad_env = dict(env, BLOBFERRY_MEMORY_MB="lots")
    config = run(["copy", f"s3://{bucket}/k", f"az://{container}/k"], bad_env)
    assert config.returncode == 2
    assert config.stderr.strip().count("\n") == 0 and "memory_mb" in config.stderr
    no_azure = {k: v for k, v in env.items() if k != "AZURE_STORAGE_CONNECTION_STRING"}
    unset = run(["copy", f"s3://{bucket}/k", f"az://{container}/k"], no_azure)
    assert unset.returncode == 2 and "azure" in unset.stderr
    unwritable = tmp_path / "unwritable-state"
    (unwritable / "blobferry.sqlite3").mkdir(parents=True)  # no database can open here
    for command in (["copy", f"s3://{bucket}/k", f"az://{container}/k"], ["run"]):
        state = run(command, dict(env, BLOBFERRY_STATE_DIR=str(unwritable)), timeout=30)
        assert state.returncode == 1, state.stderr
        assert "cannot write the state database" in state.stderr.splitlines()[-1]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for setting in ("JOBS_DIR", "STATE_DIR"):
        folder = run(["run"], dict(env, **{f"BLOBFERRY_{setting}": str(a_file / "x")}), timeout=30)
        assert folder.returncode == 2
        assert folder.stderr.strip() == (
            f"blobferry: configuration error: {setting.lower()}: cannot use {a_file / 'x'}: "
            "Not a directory"
        )


def test_run_submit_status_and_sigterm(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    env = env_for(tmp_path, moto_endpoint, azurite_endpoint)
    s3_client.put_object(Bucket=bucket, Key="p/a.bin", Body=b"a" * 1000)
    s3_client.put_object(Bucket=bucket, Key="p/b.bin", Body=b"b" * 9 * MiB)
    daemon = subprocess.Popen(
        [BLOBFERRY, "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=dies_with_this_process(),
    )
    try:
        sub = run(["submit", f"s3://{bucket}/p/", f"az://{container}/q/", "--name", "mine"], env)
        assert sub.returncode == 0 and sub.stdout.strip() == "mine.json"
        jobfile = tmp_path / "j.json"
        jobfile.write_text(
            json.dumps({"transfers": [{"source": "s3://x", "destination": "az://y"}]})
        )
        rejected = run(["submit", str(jobfile)], env)
        assert rejected.returncode == 2 and "bad address" in rejected.stderr
        report = tmp_path / "jobs" / "done" / "mine.report.json"
        deadline = time.monotonic() + 60
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert report.exists(), daemon.stderr
        status = run(["status"], env)
        assert "mine.json" in status.stdout and "2 copied" in status.stdout
        detail = run(["status", "mine"], env)
        assert f"s3://{bucket}/p/b.bin" in detail.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "ready" and events[-1] == "stopped"
    for event in ("claimed", "transfer started", "copied", "job done"):
        assert event in events
    copied = [line for line in lines if line["event"] == "copied"]
    assert {c["source"] for c in copied} == {f"s3://{bucket}/p/a.bin", f"s3://{bucket}/p/b.bin"}
    assert all(c["job"] == "mine.json" and "rate" in c and "bytes" in c for c in copied)
    assert "AccountKey" not in out and "Eby8" not in out
    assert blob_names(blob_service, container) == ["q/a.bin", "q/b.bin"]


def test_status_says_how_far_a_running_transfer_is_and_how_long_it_has_to_go() -> None:
    """At the rate of the bytes moved (a resume's reused blocks left out): 40 GiB of
    100 done in an hour, 10 GiB of them reused, is 30 GiB an hour, so 2 hours to go."""
    from daemon.records import TransferRow
    from daemon.status import duration, progress

    GiB = 1 << 30
    running = TransferRow(
        0, "s3://b/k", "az://c/k", "running", 100 * GiB, 40 * GiB, 0.0, 3600.0, None, None, {},
        bytes_reused=10 * GiB,
    )  # fmt: skip
    line = progress(running)
    assert line.startswith(f"running     {40 * GiB}/{100 * GiB} B  40.0%")
    assert line.endswith(f"{30 * GiB / 3600 / MiB:7.1f} MiB/s  ~2h00m left")
    report = running.report()  # `blobferry status JOB --json`: the same figures
    assert (report["bytes_total"], report["bytes_reused"], report["seconds_left"]) == (
        100 * GiB,
        10 * GiB,
        7200,
    )
    done = TransferRow(0, "s3://b/k", "az://c/k", "copied", 8, 8, 0.0, 2.0, 2.0, None, {})
    assert progress(done) == f"copied      8 B  {4 / MiB:7.1f} MiB/s"
    assert done.seconds_left is None
    assert not {"bytes_total", "bytes_reused", "seconds_left"} & set(done.report())
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 * 26.5, 86400 * 4)] == [
        "0s", "59s", "1m01s", "59m59s", "1d02h", "4d00h",
    ]  # fmt: skip


def test_a_copy_leaves_nothing_in_the_folder_it_runs_in_and_status_finds_it(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"here")
    env = env_for(tmp_path, moto_endpoint, azurite_endpoint, HOME=str(tmp_path / "home"))
    del env["BLOBFERRY_JOBS_DIR"], env["BLOBFERRY_STATE_DIR"]
    env.pop("XDG_STATE_HOME", None)
    env.pop("STATE_DIRECTORY", None)
    cwd = tmp_path / "anywhere"
    cwd.mkdir()
    done = subprocess.run(
        [BLOBFERRY, "copy", f"s3://{bucket}/k.bin", f"az://{container}/k.bin"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []
    assert (
        tmp_path / "home" / ".local" / "state" / "blobferry" / "state" / "blobferry.sqlite3"
    ).exists()
    status = subprocess.run(
        [BLOBFERRY, "status", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    [job] = json.loads(status.stdout)
    assert job["status"] == "done" and job["job"].startswith("copy-")
