"""Real faults: a TCP proxy between blobferry and moto, kill -9, SIGTERM, the notify socket."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr

from daemon.addresses import S3Address
from daemon.errors import RetryableError
from daemon.objects import Listed
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.systemd import Notifier
from tests.conftest import connection_string, make_settings
from tests.emulators import dies_with_this_process
from tests.helpers import (
    MiB,
    azure_through,
    blob_bytes,
    blob_names,
    copy,
    multipart_object,
    payload,
)
from tests.proxy import FaultProxy, Faults, azure_answers
from tests.sandbox import Sandbox

BLOBFERRY = str(Path(sys.executable).parent / "blobferry")


def through(settings: Settings, proxy: FaultProxy, **changes: Any) -> Settings:
    retry = {"backoff_s": 0.05, "backoff_max_s": 0.3, **changes.pop("retry", {})}
    s3 = {"endpoint_url": proxy.endpoint, **changes.pop("s3", {})}
    azure = changes.pop("azure", {})
    return settings.model_copy(
        update={
            "s3": settings.s3.model_copy(update=s3),
            "azure": settings.azure.model_copy(update=azure),
            "retry": settings.retry.model_copy(update=retry),
            **changes,
        }
    )


async def test_resets_of_every_third_connection(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    objects = {"big.bin": payload(40 * MiB + 3, seed=1)}
    objects.update({f"small/{i}.bin": payload(30_000 + i, seed=i) for i in range(10)})
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=f"src/{key}", Body=body)
    async with FaultProxy(moto_endpoint, Faults(reset_every=3, reset_after=20_000)) as proxy:
        status, rows = await copy(
            through(settings, proxy), f"s3://{bucket}/src/", f"az://{container}/dst/"
        )
    assert status == "done", [r.error for r in rows]
    assert proxy.resets >= 3
    for key, body in objects.items():
        assert blob_bytes(blob_service, container, f"dst/{key}") == body


async def test_a_stalled_connection_is_abandoned_and_retried(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(24 * MiB, seed=5)
    s3_client.put_object(Bucket=bucket, Key="s.bin", Body=body)
    async with FaultProxy(moto_endpoint, Faults(stall_every=2, stall_after=100_000)) as proxy:
        tuned = through(settings, proxy, retry={"stall_timeout_s": 1.0})
        status, [row] = await copy(tuned, f"s3://{bucket}/s.bin", f"az://{container}/s.bin")
    assert status == "done", row.error
    assert proxy.stalls >= 1
    assert blob_bytes(blob_service, container, "s.bin") == body


async def test_transfer_outlives_its_presigned_urls(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(20 * MiB, seed=7)
    s3_client.put_object(Bucket=bucket, Key="slow.bin", Body=body)
    # 2 s URLs, and a link slow enough that the copy takes several times that:
    # a URL signed once up front would be refused half-way (the proxy checks expiry).
    # Not 1 s: X-Amz-Date has whole seconds, so a 1 s URL lives 0 to 1 s, and one
    # signed at the end of a second could be refused on its way, however fresh.
    faults = Faults(rate_bps=2 * MiB, enforce_expiry=True)
    async with FaultProxy(moto_endpoint, faults) as proxy:
        tuned = through(settings, proxy, s3={"presign_expires_s": 2}, block_concurrency=2)
        t0 = time.monotonic()
        status, [row] = await copy(tuned, f"s3://{bucket}/slow.bin", f"az://{container}/slow.bin")
        took = time.monotonic() - t0
    assert status == "done", row.error
    assert took > 4, "the copy must outlive a URL for this test to mean anything"
    assert proxy.expired == 0
    assert blob_bytes(blob_service, container, "slow.bin") == body


async def test_proxy_refuses_an_expired_url(
    moto_endpoint: str, s3_client: Any, bucket: str
) -> None:
    """The expiry check the test above relies on really refuses stale URLs."""
    import aiohttp

    s3_client.put_object(Bucket=bucket, Key="k", Body=b"x")
    async with FaultProxy(moto_endpoint, Faults(enforce_expiry=True)) as proxy:
        import boto3
        from botocore.config import Config

        signer = boto3.client(
            "s3",
            endpoint_url=proxy.endpoint,
            region_name="us-east-1",
            config=Config(signature_version="s3v4"),
        )
        # X-Amz-Date is in whole seconds, so a URL signed at hh:mm:ss.999 for 1 s may be
        # refused a millisecond later: 3 s leaves the first GET at least 2 s.
        url = signer.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=3
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200
            await asyncio.sleep(3.1)
            async with http.get(url) as r:
                assert r.status == 403 and "expired" in await r.text()
    assert proxy.expired == 1


class CredentialsEndpoint:
    """A container-credentials endpoint, what ECS and EKS Pod Identity serve: each call
    issues new temporary credentials that live ``lifetime`` seconds. botocore refreshes
    them as it refreshes an instance role's (RefreshableCredentials), but without the
    grace period it gives instance-metadata credentials during an outage."""

    def __init__(self, lifetime: int, outage: range = range(0)) -> None:
        self.lifetime = lifetime
        self.outage = outage  # calls (0 = the first) answered 500, as a source that is down
        self.calls = 0
        self.issued: dict[str, float] = {}  # access key ID -> expiry (epoch s)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> CredentialsEndpoint:
        app = web.Application()
        app.router.add_get("/creds", self._issue)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/creds"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _issue(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls - 1 in self.outage:
            return web.Response(status=500, text="unavailable")
        expires = int(time.time()) + self.lifetime
        key = f"ASIATEST{len(self.issued):08d}"
        self.issued[key] = expires
        return web.json_response(
            {
                "AccessKeyId": key,
                "SecretAccessKey": os.urandom(20).hex(),
                "Token": f"token-{key}",
                "Expiration": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )


async def test_credentials_that_expire_mid_copy_are_renewed_before_each_request(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The problem statement's four-day copy outlived the instance role's credentials.
    Here each set of credentials lives 2 s, the copy takes several times that, and the
    proxy refuses (ExpiredToken, as S3 does) anything signed with credentials past their
    end: every HEAD, LIST and presigned range GET must carry credentials still alive.
    Half-way, the credentials' source is down for a moment (botocore gives up on a
    renewal after 3 tries): a presign that cannot renew them is retried like any
    passing fault, where it used to fail the transfer as an internal error."""
    body = payload(20 * MiB, seed=9)
    s3_client.put_object(Bucket=bucket, Key="long.bin", Body=body)
    async with CredentialsEndpoint(lifetime=2, outage=range(6, 12)) as creds:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", creds.url)
        faults = Faults(rate_bps=2 * MiB, credential_expiry=creds.issued)
        async with FaultProxy(moto_endpoint, faults) as proxy:
            tuned = through(settings, proxy, block_concurrency=2)
            t0 = time.monotonic()
            status, rows = await copy(tuned, f"s3://{bucket}/", f"az://{container}/")
            took = time.monotonic() - t0
    assert status == "done", [r.error for r in rows]
    assert took > 3 * creds.lifetime, "the copy must outlive several sets of credentials"
    assert len(creds.issued) >= 3 and creds.calls > creds.outage.stop  # after the outage
    assert proxy.expired == 0
    assert blob_bytes(blob_service, container, "long.bin") == body


async def test_credentials_s3_calls_expired_are_named_as_the_reason(
    settings: Settings, moto_endpoint: str, s3_client: Any, bucket: str, container: str
) -> None:
    """Credentials that are past their end and not renewed (a source that stopped
    renewing them): S3 answers ExpiredToken, and the report says so, not 'S3 answered
    ExpiredToken' or 'presigned URL expired'."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"x")
    faults = Faults(credential_expiry={os.environ["AWS_ACCESS_KEY_ID"]: 0.0})
    async with FaultProxy(moto_endpoint, faults) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/", f"az://{container}/"
        )
    assert status == "failed" and proxy.expired == settings.retry.attempts
    assert row.error is not None
    assert "S3 refused the AWS credentials as expired (ExpiredToken)" in row.error


async def test_a_heads_bare_400_gets_its_likely_causes(
    settings: Settings, moto_endpoint: str, s3_client: Any, bucket: str, container: str
) -> None:
    """A HEAD's error has no body: S3 refusing expired credentials, or an SSE-C object
    read without its key, is a bare 400, which botocore reports as code '400'."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"x")
    bare = Faults(error_every=1, error_status=400, error_match=f"HEAD /{bucket}/k".encode())
    async with FaultProxy(moto_endpoint, bare) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/k", f"az://{container}/k"
        )
    assert status == "failed" and proxy.errors >= 1  # botocore may ask twice
    assert row.error is not None and "AWS credentials are expired or invalid" in row.error
    assert "SSE-C" in row.error


async def test_source_overwritten_mid_copy_never_yields_a_mixed_blob(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="v.bin", Body=payload(32 * MiB, seed=1))
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as proxy:
        tuned = through(settings, proxy, block_concurrency=2)
        task = asyncio.create_task(copy(tuned, f"s3://{bucket}/v.bin", f"az://{container}/v.bin"))
        while proxy.bytes_down < 10 * MiB:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(
            s3_client.put_object, Bucket=bucket, Key="v.bin", Body=payload(32 * MiB, seed=2)
        )
        status, [row] = await task
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and "changed while it was being copied" in row.error
    assert blob_names(blob_service, container) == []


# -- the daemon as a process -------------------------------------------------------


def daemon_env(settings: Settings, s3_endpoint: str, azurite: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BLOBFERRY_JOBS_DIR=str(settings.jobs_dir),
        BLOBFERRY_STATE_DIR=str(settings.state_dir),
        BLOBFERRY_S3__ENDPOINT_URL=s3_endpoint,
        AZURE_STORAGE_CONNECTION_STRING=connection_string(azurite),
        BLOBFERRY_POLL_INTERVAL_S="0.2",
        BLOBFERRY_RETRY__BACKOFF_S="0.05",
        BLOBFERRY_PIPE_MAX_MB="0",  # as make_settings: these test the block path
    )
    env.update(extra)
    return env


async def start_daemon(
    env: dict[str, str], file_size_limit: int | None = None, sandbox: Sandbox | None = None
) -> asyncio.subprocess.Process:
    """`blobferry run`; with ``file_size_limit``, no file it writes may grow past that
    (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk); with ``sandbox``, inside
    those system-call filters."""
    die_with_us = dies_with_this_process()

    def limits() -> None:
        die_with_us()
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        if sandbox is not None:
            sandbox.enter()  # last: the filters forbid setrlimit

    return await asyncio.create_subprocess_exec(
        BLOBFERRY,
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limits,
    )


@asynccontextmanager
async def notified_daemon(
    env: dict[str, str], folder: Path, sandbox: Sandbox | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, socket.socket]]:
    """`blobferry run` with $NOTIFY_SOCKET on a socket of ours in ``folder``, to hear
    what it tells systemd; a daemon still running at the end is killed."""
    path = str(folder / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    proc = await start_daemon(dict(env, NOTIFY_SOCKET=path), sandbox=sandbox)
    try:
        yield proc, sock
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
        sock.close()


async def start_mid_copy(
    env: dict[str, str],
    jobs_dir: Path,
    name: str,
    job: dict[str, str],
    proxy: FaultProxy,
    read: int,
) -> asyncio.subprocess.Process:
    """A daemon started with ``env`` and given ``job`` as ``name``.json, returned once
    ``read`` bytes have come through ``proxy``: the moment to kill it or signal it."""
    proc = await start_daemon(env)
    inbox = jobs_dir / "inbox"
    while not inbox.exists():
        await asyncio.sleep(0.05)
    (inbox / f"{name}.json").write_text(json.dumps(job))
    while proxy.bytes_down < read:
        await asyncio.sleep(0.02)
    return proc


async def restart_to_report(env: dict[str, str], jobs_dir: Path, name: str) -> dict[str, Any]:
    """Start the daemon again, wait for job ``name``'s report, stop it; the report."""
    proc = await start_daemon(env)
    report = await wait_report(jobs_dir, name)
    proc.send_signal(signal.SIGTERM)
    await proc.communicate()
    return report


async def wait_report(jobs_dir: Path, name: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    for folder in ("done", "failed") * 1_000_000:
        report = jobs_dir / folder / f"{name}.report.json"
        if report.exists():
            return dict(json.loads(report.read_text()), folder=folder)
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not finish")


async def test_kill_9_mid_transfer_then_restart_rereads_only_blocks_in_flight(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    size, block = 256 * MiB, 8 * MiB  # boto3's part size; each part is one block
    body = multipart_object(s3_client, bucket, "huge.bin", size, block)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=6 * MiB)) as proxy:
        env = daemon_env(settings, proxy.endpoint, azurite_endpoint)
        job = {"source": f"s3://{bucket}/huge.bin", "destination": f"az://{container}/huge.bin"}
        first = await start_mid_copy(env, settings.jobs_dir, "huge", job, proxy, size // 2)
        first.kill()  # SIGKILL: no drain, no cleanup
        await first.wait()
        # A Put Block whose body reached Azurite before the kill may still be landing:
        # give it a second. The proxy may still be reading a response for a dead socket
        # (a rate-limited pump notices the reset only on its next write, which took
        # > 1 s on CI): count what the first run read once all its connections are gone.
        await asyncio.sleep(1)
        deadline = time.monotonic() + 30
        while proxy.open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert proxy.open == 0, "the killed daemon's connections never closed"
        read_before = proxy.bytes_down
        staged = blob_service.get_blob_client(container, "huge.bin").get_block_list("uncommitted")[
            1
        ]
        assert (settings.jobs_dir / "processing" / "huge.json").exists()
        proxy.faults.rate_bps = None
        report = await restart_to_report(env, settings.jobs_dir, "huge")
        read_after = proxy.bytes_down - read_before
    assert report["folder"] == "done", report
    [t] = report["transfers"]
    assert t["blocks_reused"] == len(staged) > 0
    # The block IDs carry their MD5s, so the resumed copy is still proven end to end.
    assert t["verified"] == "multipart-etag"
    # After the restart, only what was not yet staged is read again: the blocks in
    # flight at the kill (as many as the memory budget holds, within block_concurrency)
    # and those never started.
    unstaged = size - sum(b.size for b in staged)
    overhead = 256 * 1024  # response headers of the GETs, part HEADs and listings
    assert read_after <= unstaged + overhead
    in_flight = min(settings.block_concurrency, settings.memory_bytes // block)
    assert read_before + read_after <= size + in_flight * block + 2 * overhead
    print(
        f"\nkill -9 at {read_before / MiB:.1f} MiB read; {len(staged)} blocks staged "
        f"({sum(b.size for b in staged) / MiB:.0f} MiB); after restart read "
        f"{read_after / MiB:.1f} MiB; total {(read_before + read_after) / MiB:.1f} MiB "
        f"for a {size / MiB:.0f} MiB object"
    )
    assert blob_bytes(blob_service, container, "huge.bin") == body


async def test_sigterm_drains_within_grace_and_the_job_resumes(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    size = 96 * MiB
    body = payload(size, seed=11)
    s3_client.put_object(Bucket=bucket, Key="t.bin", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as proxy:
        # A budget of 16 of the object's 24 blocks, so some have not started at the signal.
        env = daemon_env(
            settings,
            proxy.endpoint,
            azurite_endpoint,
            BLOBFERRY_GRACE_PERIOD_S="20",
            BLOBFERRY_MEMORY_MB="64",
        )
        job = {"source": f"s3://{bucket}/t.bin", "destination": f"az://{container}/t.bin"}
        first = await start_mid_copy(env, settings.jobs_dir, "t", job, proxy, 20 * MiB)
        t0 = time.monotonic()
        first.send_signal(signal.SIGTERM)
        out, _ = await first.communicate()
        took = time.monotonic() - t0
        assert first.returncode == 0
        assert took < 20
        events = [json.loads(line)["event"] for line in out.decode().splitlines()]
        assert "draining" in events and "stopped" in events and "job done" not in events
        assert (settings.jobs_dir / "processing" / "t.json").exists()
        assert blob_names(blob_service, container) == []  # nothing committed yet
        staged = blob_service.get_blob_client(container, "t.bin").get_block_list("uncommitted")[1]
        assert staged, "the blocks in flight were allowed to land"
        proxy.faults.rate_bps = None
        report = await restart_to_report(env, settings.jobs_dir, "t")
    assert report["folder"] == "done"
    assert report["transfers"][0]["blocks_reused"] == len(staged)
    assert blob_bytes(blob_service, container, "t.bin") == body


async def test_second_signal_stops_at_once(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="t.bin", Body=payload(64 * MiB, seed=3))
    async with FaultProxy(moto_endpoint, Faults(rate_bps=1 * MiB)) as proxy:
        env = daemon_env(settings, proxy.endpoint, azurite_endpoint, BLOBFERRY_GRACE_PERIOD_S="60")
        job = {"source": f"s3://{bucket}/t.bin", "destination": f"az://{container}/t.bin"}
        proc = await start_mid_copy(env, settings.jobs_dir, "t", job, proxy, 2 * MiB)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        await proc.communicate()
        assert time.monotonic() - t0 < 10 and proc.returncode == 0
    assert (settings.jobs_dir / "processing" / "t.json").exists()


async def test_notify_socket_protocol(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
) -> None:
    settings = make_settings(tmp_path, moto_endpoint, azurite_endpoint)
    env = daemon_env(settings, moto_endpoint, azurite_endpoint, WATCHDOG_USEC="400000")
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    async with notified_daemon(env, tmp_path) as (proc, sock):
        while (
            not any("READY=1" in m for m in messages)
            or sum("WATCHDOG=1" in m for m in messages) < 3
        ):
            messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode())
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode())
        await proc.communicate()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready and "jobs" in ready
    assert proc.returncode == 0


def test_notifier_abstract_namespace_and_outside_systemd() -> None:
    name = f"blobferry-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    n = Notifier(
        {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.watchdog_interval == 1.0
    n.ready("hello")
    assert sock.recv(100) == b"READY=1\nSTATUS=hello"
    n.close()
    sock.close()
    off = Notifier({})
    assert not off.enabled and off.watchdog_interval is None
    off.ready("nothing happens")
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is another process's
    other.close()


SLOWDOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
SERVERBUSY = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
    b"<Message>The server is busy.</Message></Error>"
)


async def test_throttling_on_both_sides_is_retried_per_request(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    objects = {"big.bin": payload(24 * MiB, seed=8)}
    objects.update({f"s{i}.bin": payload(2000 + i, seed=i) for i in range(6)})
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=f"t/{key}", Body=body)
    s3_faults = Faults(
        error_every=3,
        error_status=503,
        error_body=SLOWDOWN,
        error_match=f"GET /{bucket}/t/".encode(),
    )
    az_faults = Faults(
        error_every=3,
        error_status=503,
        error_body=SERVERBUSY,
        error_headers="x-ms-error-code: ServerBusy\r\n",
        error_match=b"PUT ",
    )
    async with (
        FaultProxy(moto_endpoint, s3_faults) as s3p,
        FaultProxy(azurite_endpoint, az_faults) as azp,
    ):
        tuned = through(
            settings, s3p, azure={"connection_string": SecretStr(connection_string(azp.endpoint))}
        )
        status, rows = await copy(tuned, f"s3://{bucket}/t/", f"az://{container}/t/")
    assert status == "done", [r.error for r in rows]
    assert s3p.errors >= 2 and azp.errors >= 2
    for key, body in objects.items():
        assert blob_bytes(blob_service, container, f"t/{key}") == body


async def test_a_listing_outlasting_botocores_retries_is_retried(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """S3 answering SlowDown to the first 5 LISTs must not end a prefix job's listing:
    pages are retried with the same patience as every other request (botocore's own
    retries, which gave up within a second or two, are off)."""
    for i in range(3):
        s3_client.put_object(Bucket=bucket, Key=f"l/{i}", Body=payload(100 + i, seed=i))
    faults = Faults(
        error_first=5, error_status=503, error_body=SLOWDOWN, error_match=b"list-type=2"
    )
    async with FaultProxy(moto_endpoint, faults) as proxy:
        status, rows = await copy(
            through(settings, proxy), f"s3://{bucket}/l/", f"az://{container}/"
        )
    assert status == "done", [r.error for r in rows]
    assert proxy.errors == 5
    for i in range(3):
        assert blob_bytes(blob_service, container, str(i)) == payload(100 + i, seed=i)


async def test_one_head_is_tried_retry_attempts_times_in_all(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """One retry layer: a HEAD that S3 keeps answering with 503 reaches S3
    retry.attempts times, not botocore's 5 under each of ours (it was 5 x 3 here)."""
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=payload(5 * MiB))
    faults = Faults(error_every=1, error_status=503, error_match=f"HEAD /{bucket}/k.bin".encode())
    async with FaultProxy(moto_endpoint, faults) as proxy:
        tuned = through(settings, proxy)
        tuned = tuned.model_copy(update={"retry": tuned.retry.model_copy(update={"attempts": 3})})
        status, [row] = await copy(tuned, f"s3://{bucket}/k.bin", f"az://{container}/k.bin")
    assert status == "failed" and row.error is not None and "gave up after 3 attempts" in row.error
    assert proxy.errors == 3, proxy.requests


async def test_a_permanent_error_fails_at_once_without_retrying(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="denied.bin", Body=payload(20 * MiB))
    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    faults = Faults(
        error_every=1,
        error_status=403,
        error_body=denied,
        error_match=f"GET /{bucket}/denied".encode(),
    )
    async with FaultProxy(moto_endpoint, faults) as proxy:
        tuned = through(settings, proxy, block_concurrency=1)
        status, [row] = await copy(tuned, f"s3://{bucket}/denied.bin", f"az://{container}/d.bin")
    assert (status, row.status) == ("failed", "failed")
    assert (
        row.error is not None and "access denied by S3 (AccessDenied: Access Denied)" in row.error
    )
    assert proxy.errors == 1  # one refused GET, no retry
    assert blob_names(blob_service, container) == []


async def test_an_azure_endpoint_that_refuses_connections_is_named_with_the_reason(
    tmp_path: Path, moto_endpoint: str, s3_client: Any, bucket: str
) -> None:
    """Nothing listens at the Azure endpoint. The error said "connection failed
    (ClientConnectorError)", which hid where and why: a port nothing listens on, a
    host that does not resolve, a process out of file descriptors all read the same."""
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"kkk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # reserved, never listening: connections are refused
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
        settings = make_settings(tmp_path, moto_endpoint, closed)
        tuned = settings.model_copy(
            update={"retry": settings.retry.model_copy(update={"attempts": 2, "backoff_s": 0.05})}
        )
        status, [row] = await copy(tuned, f"s3://{bucket}/k", "az://ctr/k")
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None
    assert row.error.endswith(
        f"gave up after 2 attempts; last error: az://ctr/k: read properties: connection "
        f"failed (ClientConnectorError: 127.0.0.1:{closed.rsplit(':', 1)[1]}: Connection refused)"
    )


async def test_an_s3_read_that_cannot_connect_is_named_with_the_reason(
    tmp_path: Path, moto_endpoint: str, azurite_endpoint: str, s3_client: Any, bucket: str
) -> None:
    """The presigned GETs go out by aiohttp or http1.py, not botocore. One whose connection was
    refused read "ClientConnectorError: Cannot connect to host ... [Connect call failed
    (...)]". It is worded as Azure's are now: where, and the OS's reason. (S3 goes away
    after the reader has learnt the bucket; a refusal at the start is botocore's, which
    names the URL.)"""
    etag = s3_client.put_object(Bucket=bucket, Key="k", Body=b"kkk")["ETag"]
    listed, address = Listed("k", 3, etag), S3Address(bucket, "k")
    async with FaultProxy(moto_endpoint, Faults()) as proxy:
        settings = make_settings(tmp_path, proxy.endpoint, azurite_endpoint)
        port = proxy.endpoint.rsplit(":", 1)[1]
        async with S3Reader(settings) as s3:
            assert (await s3.read_object(listed, address))[1].join() == b"kkk"
            await proxy.__aexit__(None, None, None)  # nothing listens there any more
            with pytest.raises(RetryableError) as e:
                await s3.read_object(listed, address)
    # Read around aiohttp (http1.py), the OS's words are the same.
    assert str(e.value) == (
        f"GET s3://{bucket}/k: connection failed (ConnectionRefusedError: 127.0.0.1:{port}: "
        "Connection refused)"
    )


@pytest.mark.parametrize("route", ["whole", "pipe", "blocks"])
async def test_a_write_whose_answer_is_lost_is_not_refused_by_its_own_retry(
    route: str,
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """With overwrite 'never' every write is conditional on the blob's absence. Azure
    commits, the answer is lost (a reset), the write is sent again and refused: the
    blob exists. It is this very copy, so the transfer is copied, not failed as
    'already exists'."""
    data = payload(1024 if route == "whole" else 9 * MiB, seed=12)
    s3_client.put_object(Bucket=bucket, Key="o.bin", Body=data)
    commit = (
        b"comp=blocklist"
        if route == "blocks"
        else f"PUT /devstoreaccount1/{container}/o.bin HTTP".encode()
    )
    async with FaultProxy(azurite_endpoint, Faults(lose_reply_match=commit)) as azp:
        pipe_max_mb = 16 if route == "pipe" else 0
        tuned = azure_through(settings, azp.endpoint, pipe_max_mb=pipe_max_mb, pipe_rtt_ms=1000.0)
        status, [row] = await copy(
            tuned, f"s3://{bucket}/o.bin", f"az://{container}/o.bin", overwrite="never"
        )
    assert azp.lost_replies == 1
    assert status == "done", row.error
    assert (row.status, row.detail["route"]) == ("copied", route)
    assert blob_bytes(blob_service, container, "o.bin") == data


async def test_a_refusal_as_existing_is_believed_when_the_blob_is_not_this_copy(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """The other side of the test above: Azure says the blob exists (here the proxy says
    it, and nothing is there) and no blob holding this copy is found, so the transfer
    fails as 'already exists': only this very copy is taken for a lost answer."""
    s3_client.put_object(Bucket=bucket, Key="o.bin", Body=b"data")
    exists = azure_answers(
        f"PUT /devstoreaccount1/{container}/o.bin HTTP".encode(), 409, "BlobAlreadyExists"
    )
    async with FaultProxy(azurite_endpoint, exists) as azp:
        tuned = azure_through(settings, azp.endpoint)
        status, [row] = await copy(
            tuned, f"s3://{bucket}/o.bin", f"az://{container}/o.bin", overwrite="never"
        )
    assert azp.errors == 1
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and "already exists and overwrite is 'never'" in row.error
    assert blob_names(blob_service, container) == []


@pytest.mark.parametrize("writes", ["http1", "aiohttp"])
async def test_an_upload_that_stalls_is_cut_and_sent_again(
    writes: str,
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(64 * MiB, seed=13)
    s3_client.put_object(Bucket=bucket, Key="up.bin", Body=body)
    # The first connection to Azure that uploads 1 MiB (a block's) stops being read
    # there. A 32 MiB block is more than the sockets' buffers hold, so the sender itself
    # blocks: only a deadline on progress can see it.
    faults = Faults(upload_stall_at=-1, upload_stall_after=1 * MiB)
    async with FaultProxy(azurite_endpoint, faults) as azp:
        tuned = through(
            settings,
            azp,
            s3={"endpoint_url": moto_endpoint},
            azure={
                "connection_string": SecretStr(connection_string(azp.endpoint)),
                "direct_writes": writes == "http1",
            },
            retry={"stall_timeout_s": 1.0},
            block_size_mb=32,
        )
        t0 = time.monotonic()
        status, [row] = await asyncio.wait_for(
            copy(tuned, f"s3://{bucket}/up.bin", f"az://{container}/up.bin"), 120
        )
    assert azp.upload_stalls == 1
    assert status == "done", row.error
    assert time.monotonic() - t0 < 60
    assert blob_bytes(blob_service, container, "up.bin") == body


async def test_a_state_disk_that_fills_stops_the_daemon_and_the_job_resumes_after(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """The instance's disk is small and shared: the state database may find it full.
    A real write limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk)
    makes SQLite fail during a job. The daemon says why and stops (systemd starts it
    again), the job waits in processing/ with no report, and each blob that landed is
    whole. Started again with room, the job resumes: what landed is skipped."""
    objects = {f"p/{n:02d}-" + "k" * 900: payload(2000, seed=n) for n in range(40)}
    for key, body in objects.items():  # 40 rows of ~2 KB: more than the limit below
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    env = daemon_env(settings, moto_endpoint, azurite_endpoint)
    proc = await start_daemon(env, file_size_limit=64 * 1024)
    inbox = settings.jobs_dir / "inbox"
    while not inbox.exists():
        await asyncio.sleep(0.05)
    job = {"source": f"s3://{bucket}/p/", "destination": f"az://{container}/q/"}
    (inbox / "full.json").write_text(json.dumps(job))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert "cannot write the state database" in err.decode(), err.decode()[-2000:]
    assert "free space on its disk" in err.decode()
    stopped = [json.loads(line) for line in out.decode().splitlines()]
    assert any(e["event"] == "stopping: the state cannot be written" for e in stopped)
    assert os.listdir(settings.jobs_dir / "processing") == ["full.json"]
    assert os.listdir(settings.jobs_dir / "done") == os.listdir(settings.jobs_dir / "failed") == []
    landed = blob_names(blob_service, container)  # all or some: commits come each second
    for name in landed:
        assert blob_bytes(blob_service, container, name) == objects["p/" + name[2:]]

    report = await restart_to_report(env, settings.jobs_dir, "full")
    assert report["folder"] == "done", report.get("error")
    statuses = [t["status"] for t in report["transfers"]]
    assert len(statuses) == len(objects)
    assert statuses.count("skipped") == len(landed)  # what landed is not copied again
    for key, body in objects.items():
        assert blob_bytes(blob_service, container, "q/" + key[2:]) == body
