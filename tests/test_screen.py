"""What a person sees: `blobferry copy` on a real pseudo-terminal, the screen read back
as a terminal would show it; the figures behind it; and the health endpoints."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from azure.storage.blob import BlobServiceClient

from daemon.outcome import Status
from daemon.progress import JobProgress, RecentRate, seconds_left
from tests.emulators import dies_with_this_process, free_port
from tests.helpers import MiB, blob_bytes, payload
from tests.proxy import FaultProxy, Faults
from tests.test_cli import BLOBFERRY, env_for
from tests.test_faults import daemon_env, start_daemon

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def test_the_rate_is_recent_and_the_time_to_go_follows_it() -> None:
    rate = RecentRate(window=10)
    for t in range(0, 31):  # 1 MB/s for 20 s, then 5 MB/s
        rate.add(float(t), t * 1_000_000 if t <= 20 else 20_000_000 + (t - 20) * 5_000_000)
    assert rate.rate() == pytest.approx(5_000_000, rel=0.01)
    assert rate.rate(now=40.0) == pytest.approx(2_500_000, rel=0.01)  # quiet since 30 s
    assert seconds_left(10_000_000, 5_000_000) == 2.0
    assert seconds_left(10, 0.0) is None and seconds_left(0, 0.0) == 0.0


def test_a_job_in_progress_counts_objects_bytes_and_what_dropped_out() -> None:
    p = JobProgress()
    p.listing_started()
    p.found(3, 300)
    assert p.view().listing and p.view().fraction is None
    p.listing_ended()
    p.started(0, "s3://b/a", 100)
    p.started(1, "s3://b/b", 150)
    p.started(2, "s3://b/c", 50)
    p.advanced(0, 60, reused=True)  # staged by an earlier run: done, not moved
    p.advanced(1, 150, reused=False)
    p.ended(1, Status.COPIED)
    p.ended(2, Status.SKIPPED)  # its 50 bytes are no longer to do
    v = p.view()
    assert (v.bytes_done, v.bytes_total) == (210, 250)
    assert (v.objects_done, v.objects_total, v.copied, v.skipped) == (2, 3, 1, 1)
    assert [t.name for t in v.largest] == ["s3://b/a"]
    assert v.fraction == pytest.approx(210 / 250)


def _read_screen(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out.decode(errors="replace")


def test_copy_on_a_terminal_shows_totals_percent_time_to_go_and_objects(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Four objects of 6 MiB through a proxy of 4 MiB/s a connection: a few seconds of
    screen, redrawn in place, then one plain line at 100%."""
    for i in range(4):
        s3_client.put_object(Bucket=bucket, Key=f"d/{i}.bin", Body=payload(6 * MiB, seed=i))
    env = env_for(
        tmp_path, moto_endpoint, azurite_endpoint, COLUMNS="120", LINES="40", TERM="xterm"
    )

    async def run() -> tuple[int, str]:
        async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as slow:
            env["BLOBFERRY_S3__ENDPOINT_URL"] = slow.endpoint
            env["BLOBFERRY_PIPE_MAX_MB"] = "0"
            main, child = pty.openpty()
            with subprocess.Popen(  # noqa: ASYNC220 (its terminal is read in a thread)
                [BLOBFERRY, "copy", f"s3://{bucket}/d/", f"az://{container}/d/"],
                env=env,
                stdin=child,
                stdout=subprocess.PIPE,  # the report: not the screen
                stderr=child,
                preexec_fn=dies_with_this_process(),
            ) as proc:
                os.close(child)
                screen = await asyncio.to_thread(_read_screen, main, proc, 120)
                assert proc.stdout is not None
                report = json.loads(proc.stdout.read())
                os.close(main)
                assert report["status"] == "done", report
                return proc.wait(30), screen

    code, raw = asyncio.run(run())
    assert code == 0
    screen = _ANSI.sub("", raw)
    assert "24.0 MiB" in screen  # the total
    assert re.search(r"\d+%", screen) and re.search(r"\d:\d\d:\d\d left", screen)
    assert re.search(r"objects [0-3] / 4", screen)  # a moment on the way
    last = [line for line in screen.splitlines() if line.strip()][-1]
    assert "24.0 MiB / 24.0 MiB  100%" in last and "objects 4 / 4" in last
    assert "\x1b[" in raw  # drawn in place, with the terminal's controls
    for i in range(4):
        assert blob_bytes(blob_service, container, f"d/{i}.bin") == payload(6 * MiB, seed=i)


def test_nothing_of_the_screen_when_stderr_is_not_a_terminal(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"x" * 1000)
    env = env_for(tmp_path, moto_endpoint, azurite_endpoint)
    done = subprocess.run(
        [BLOBFERRY, "copy", f"s3://{bucket}/k.bin", f"az://{container}/k.bin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "objects" not in done.stderr and "\x1b[" not in done.stderr


async def test_health_and_readiness_answer_at_once_under_a_large_copy(
    tmp_path: Path,
    settings: Any,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    """A 48 MiB object copying through a proxy of 6 MiB/s a connection, two at once:
    /healthz and /readyz answer in well under 100 ms throughout; on SIGTERM /readyz
    says draining."""
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=payload(48 * MiB))
    port = free_port()
    async with FaultProxy(moto_endpoint, Faults(rate_bps=6 * MiB)) as slow:
        env = daemon_env(
            settings,
            slow.endpoint,
            azurite_endpoint,
            BLOBFERRY_METRICS_ADDRESS=f"127.0.0.1:{port}",
            BLOBFERRY_BLOCK_CONCURRENCY="2",  # 12 MiB/s in all: about 4 s for the object
        )
        proc = await start_daemon(env)
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                await _until_serving(http, base)
                job = {
                    "source": f"s3://{bucket}/big.bin",
                    "destination": f"az://{container}/big.bin",
                }
                (settings.jobs_dir / "inbox" / "big.json").write_text(json.dumps(job))
                while not (settings.jobs_dir / "processing" / "big.json").exists():
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # blocks in flight
                slowest = 0.0
                for _ in range(20):
                    for path, status, text in (("/healthz", 200, "ok"), ("/readyz", 200, "ready")):
                        t0 = time.monotonic()
                        async with http.get(base + path) as r:
                            assert (r.status, (await r.text()).strip()) == (status, text)
                        slowest = max(slowest, time.monotonic() - t0)
                    await asyncio.sleep(0.05)
                assert slowest < 0.1, f"slowest answer {slowest * 1000:.0f} ms"
                assert slow.bytes_down < 40 * MiB  # the copy was still running
                proc.send_signal(signal.SIGTERM)
                said = await _readiness_while_draining(http, base)
            assert said is not None and "draining" in said
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0


async def _until_serving(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with http.get(base + "/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise AssertionError("the daemon never served /healthz")


async def _readiness_while_draining(http: aiohttp.ClientSession, base: str) -> str | None:
    """What /readyz says between SIGTERM and the end (None if it never said no)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            async with http.get(base + "/readyz") as r:
                if r.status == 503:
                    return await r.text()
        except aiohttp.ClientError:
            return None  # gone before it was asked
        await asyncio.sleep(0.02)
    return None


async def test_status_watch_shows_the_daemons_job_as_copy_shows_it(
    tmp_path: Path,
    settings: Any,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    """A job of the daemon's, copying slowly; `blobferry status --watch JOB` on a
    terminal draws its figures from the state database until Ctrl-C."""
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=payload(24 * MiB))
    async with FaultProxy(moto_endpoint, Faults(rate_bps=2 * MiB)) as slow:
        env = daemon_env(
            settings,
            slow.endpoint,
            azurite_endpoint,
            BLOBFERRY_PROGRESS_INTERVAL_S="0.2",
            BLOBFERRY_BLOCK_CONCURRENCY="1",  # one connection: about 12 s for the object
        )
        daemon = await start_daemon(env)
        try:
            while not (settings.jobs_dir / "inbox").exists():
                await asyncio.sleep(0.05)
            job = {"source": f"s3://{bucket}/big.bin", "destination": f"az://{container}/b"}
            (settings.jobs_dir / "inbox" / "big.json").write_text(json.dumps(job))
            while not (settings.jobs_dir / "processing" / "big.json").exists():
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)
            watch_env = dict(env, COLUMNS="120", LINES="40", TERM="xterm")
            screen = await asyncio.to_thread(_watch_for, watch_env, "big", 4.0)
        finally:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.communicate(), 60)
    text = _ANSI.sub("", screen)
    assert "/ 24.0 MiB" in text and "objects 0 / 1" in text, text[-2000:]
    assert re.search(r"\d+%", text) and "left" in text and "big.bin" in text


def _watch_for(env: dict[str, str], job: str, seconds: float) -> str:
    main, child = pty.openpty()
    with subprocess.Popen(
        [BLOBFERRY, "status", "--watch", job],
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
        preexec_fn=dies_with_this_process(),
    ) as proc:
        os.close(child)
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        screen = _read_screen(main, proc, 10)
        os.close(main)
        assert proc.wait(10) == 0
    return screen
