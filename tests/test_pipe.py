"""The pipe: on a near link, an object goes as one GET streamed into one Put Blob that
carries S3's own MD5 (a single-part object's ETag) or, for any other, S3's full-object
CRC64NVME, so Azure checks every byte and nothing is hashed here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
from typing import Any

import pytest
from awscrt import checksums
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr

from daemon.addresses import AzAddress
from daemon.azure import AzureWriter
from daemon.blockcheck import BlockCheck, Kind, compute, of_s3_crc64nvme
from daemon.chunks import Chunks
from daemon.errors import CorruptBlockError
from daemon.latency import RoundTrips
from daemon.properties import BlobHeaders
from daemon.records import TransferRow
from daemon.seams import ANYTHING
from daemon.settings import Settings
from daemon.verify import AZURE_CHECKED_CRC64
from tests.conftest import connection_string
from tests.helpers import (
    MiB,
    blob_bytes,
    blob_md5,
    blob_names,
    copy,
    multipart_object,
    payload,
)
from tests.proxy import FaultProxy, Faults
from tests.test_faults import (
    daemon_env,
    restart_to_report,
    start_mid_copy,
    through,
    wait_report,
)


@pytest.fixture
def piping(settings: Settings) -> Settings:
    """Pipes on, whatever this machine's load does to the emulators' round trips."""
    return settings.model_copy(update={"pipe_max_mb": 16, "pipe_rtt_ms": 1000.0})


# As ``piping``, for a daemon process (whose objects here are at most 24 MiB).
PIPING = {"BLOBFERRY_PIPE_MAX_MB": "32", "BLOBFERRY_PIPE_RTT_MS": "1000"}


def gets(proxy: FaultProxy, key: str) -> int:
    return sum(r.startswith("GET ") and key in r for r in proxy.requests)


def heads(proxy: FaultProxy, key: str) -> int:
    return sum(r.startswith("HEAD ") and r.endswith(f"/{key}") for r in proxy.requests)


async def copy_through_proxies(
    settings: Settings,
    s3: tuple[str, Faults | None],
    azure: tuple[str, Faults | None],
    source: str,
    destination: str,
    **changes: Any,
) -> tuple[TransferRow, FaultProxy, FaultProxy]:
    """Copy one object with a fault proxy (endpoint, faults) before each service; the
    transfer's row and both proxies, whose requests can still be read."""
    async with FaultProxy(*s3) as s3p, FaultProxy(*azure) as azp:
        via = SecretStr(connection_string(azp.endpoint))
        tuned = through(settings, s3p, azure={"connection_string": via}, **changes)
        status, [row] = await copy(tuned, source, destination)
    assert status == "done", row.error
    return row, s3p, azp


async def test_each_object_takes_its_route(
    piping: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    bodies = {
        "small.bin": payload(1 * MiB, seed=1),  # a block or less: whole
        "single.bin": payload(12 * MiB + 5, seed=2),  # single-part, within pipe_max: pipe
        "over.bin": payload(20 * MiB, seed=3),  # over pipe_max (16 MiB): blocks
    }
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=f"src/{key}", Body=body)
    # The ETag of a multipart object is no MD5 Azure could check: blocks.
    bodies["multi.bin"] = multipart_object(s3_client, bucket, "src/multi.bin", 12 * MiB, 5 * MiB)
    async with FaultProxy(moto_endpoint) as proxy:
        status, rows = await copy(
            through(piping, proxy), f"s3://{bucket}/src/", f"az://{container}/dst/"
        )
    assert status == "done", [r.error for r in rows]
    route = {r.source.rsplit("/", 1)[1]: r.detail for r in rows}
    assert {k: d["route"] for k, d in route.items()} == {
        "small.bin": "whole",
        "single.bin": "pipe",
        "over.bin": "blocks",
        "multi.bin": "blocks",
    }
    assert route["single.bin"]["verified"].startswith("etag: Azure checked")
    assert gets(proxy, "single.bin") == 1  # one stream, no ranges
    assert gets(proxy, "over.bin") == 5
    for key, body in bodies.items():
        assert blob_bytes(blob_service, container, f"dst/{key}") == body
    # The piped blob's Content-MD5 is S3's ETag, which Azure checked on arrival.
    props = blob_service.get_blob_client(container, "dst/single.bin").get_blob_properties()
    assert bytes(props.content_settings.content_md5) == hashlib.md5(bodies["single.bin"]).digest()
    assert props.metadata["blobferry_source_etag"] == hashlib.md5(bodies["single.bin"]).hexdigest()


@pytest.mark.parametrize("far", ["s3", "azure"])
async def test_a_far_link_gets_parallel_blocks(
    far: str,
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """One stream is slow over distance: either side 30+ ms away means blocks."""
    body = payload(12 * MiB, seed=4)
    s3_client.put_object(Bucket=bucket, Key="far.bin", Body=body)
    delayed = Faults(delay_s=0.03)  # per chunk the server sends: every answer is late
    row, s3p, azp = await copy_through_proxies(
        settings,
        (moto_endpoint, delayed if far == "s3" else None),
        (azurite_endpoint, delayed if far == "azure" else None),
        f"s3://{bucket}/far.bin",
        f"az://{container}/far.bin",
        pipe_max_mb=16,  # pipe_rtt_ms at its default, 10 ms
    )
    assert row.detail["route"] == "blocks"
    assert gets(s3p, "far.bin") == 3
    # Judged far on three late answers, not on one (see the test below), after the
    # client's first, which is not counted.
    assert heads(s3p if far == "s3" else azp, "far.bin") == 4
    assert blob_bytes(blob_service, container, "far.bin") == body


@pytest.mark.parametrize("late", ["s3", "azure"])
async def test_one_late_answer_does_not_make_a_near_link_far(
    late: str,
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A busy moment (a garbage collection, the other core taken) makes one HEAD late.
    Judged on it alone, a near link lost the pipe for the whole object; the service is
    asked again before it is judged far. The client's first answer, late too, does not
    count (latency.py)."""
    body = payload(12 * MiB, seed=6)
    s3_client.put_object(Bucket=bucket, Key="near.bin", Body=body)
    once = Faults(late_first=2, late_s=0.5)  # the first two answers only
    row, s3p, azp = await copy_through_proxies(
        settings,
        (moto_endpoint, once if late == "s3" else None),
        (azurite_endpoint, once if late == "azure" else None),
        f"s3://{bucket}/near.bin",
        f"az://{container}/near.bin",
        pipe_max_mb=16,
        pipe_rtt_ms=150.0,  # far above a HEAD's time on a loaded machine, below 0.5 s
    )
    assert row.detail["route"] == "pipe"
    assert heads(s3p if late == "s3" else azp, "near.bin") == 3  # two late ones, one more
    assert blob_bytes(blob_service, container, "near.bin") == body


def put_checks(monkeypatch: pytest.MonkeyPatch) -> list[BlockCheck]:
    """The check each Put Blob a pipe sends carries, in order."""
    checks: list[BlockCheck] = []
    put_stream = AzureWriter.put_stream

    async def seen(self: AzureWriter, *args: Any, **kwargs: Any) -> None:
        checks.append(args[3])  # dst, body, size, check, ...
        await put_stream(self, *args, **kwargs)

    monkeypatch.setattr(AzureWriter, "put_stream", seen)
    return checks


def an_object(s3_client: Any, bucket: str, key: str, check: str, size: int) -> bytes:
    """A single-part object (its ETag the MD5 Azure checks), or a multipart one with
    S3's full-object CRC64NVME, as S3 keeps of objects uploaded without a checksum."""
    if check == "md5":
        body = payload(size, seed=size)
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
        return body
    return multipart_object(s3_client, bucket, key, size, 5 * MiB, full="CRC64NVME")


async def test_a_multipart_object_goes_whole_checked_against_s3s_crc64nvme(
    piping: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its ETag is no MD5, but S3's CRC64NVME is of the same bytes: Azure checks the
    stream against it, and stores the MD5 of what arrived as the blob's Content-MD5."""
    checks = put_checks(monkeypatch)
    body = an_object(s3_client, bucket, "crc.bin", "crc64", 12 * MiB + 7)
    async with FaultProxy(moto_endpoint) as proxy:
        status, [row] = await copy(
            through(piping, proxy), f"s3://{bucket}/crc.bin", f"az://{container}/crc.bin"
        )
    assert status == "done", row.error
    assert (row.detail["route"], row.detail["verified"]) == ("pipe", AZURE_CHECKED_CRC64)
    assert gets(proxy, "crc.bin") == 1  # one stream, no ranges
    assert [c.kind for c in checks] == [Kind.CRC64]
    assert blob_bytes(blob_service, container, "crc.bin") == body
    assert blob_md5(blob_service, container, "crc.bin") == hashlib.md5(body).digest()


def test_azures_crc64_header_is_s3s_crc64nvme_turned_around() -> None:
    """S3 gives the CRC big-endian, Azure takes it little-endian: the header for S3's
    value is the one a block of the same bytes carries (which Azurite checks)."""
    body = payload(3 * MiB + 11, seed=12)
    crc = checksums.crc64nvme(body)
    s3_value = base64.b64encode(crc.to_bytes(8, "big")).decode()
    ours = compute(Kind.CRC64, Chunks([body]))
    assert of_s3_crc64nvme(s3_value) == ours
    assert ours.headers() == {
        "x-ms-content-crc64": base64.b64encode(crc.to_bytes(8, "little")).decode()
    }


@pytest.mark.parametrize("direct", [True, False])
async def test_put_blob_against_s3s_crc64nvme_by_either_path(
    direct: bool, settings: Settings, blob_service: BlobServiceClient, container: str
) -> None:
    """The direct path and the SDK's (azure.direct = false) send a Put Blob that Azure
    checks against the CRC, store the MD5 Azure computed, and refuse other bytes."""
    body = payload(300 * 1024 + 3, seed=13)
    crc = base64.b64encode(checksums.crc64nvme(body).to_bytes(8, "big")).decode()
    data = Chunks.of(bytearray(body))
    tuned = settings.model_copy(
        update={"azure": settings.azure.model_copy(update={"direct": direct})}
    )
    async with AzureWriter(tuned) as az:
        dst = AzAddress(container, "put.bin")
        await az.put(dst, data, of_s3_crc64nvme(crc), BlobHeaders(), {}, ANYTHING)
        other = AzAddress(container, "refused.bin")
        wrong = of_s3_crc64nvme(base64.b64encode(bytes(8)).decode())
        with pytest.raises(CorruptBlockError, match="Crc64Mismatch"):
            await az.put(other, data, wrong, BlobHeaders(), {}, ANYTHING)
    assert blob_bytes(blob_service, container, "put.bin") == body
    assert blob_md5(blob_service, container, "put.bin") == hashlib.md5(body).digest()
    assert blob_names(blob_service, container) == ["put.bin"]


@pytest.mark.parametrize("check", ["md5", "crc64"])
async def test_damaged_bytes_are_refused_by_azure_and_sent_again(
    check: str,
    piping: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = an_object(s3_client, bucket, "d.bin", check, 12 * MiB)
    async with FaultProxy(moto_endpoint, Faults(flip_at=5 * MiB)) as proxy:
        status, [row] = await copy(
            through(piping, proxy), f"s3://{bucket}/d.bin", f"az://{container}/d.bin"
        )
    assert proxy.flips == 1
    assert status == "done", row.error
    assert row.detail["route"] == "pipe"
    assert row.detail["note"] == "Azure found the bytes damaged 1 time(s); sent again"
    assert gets(proxy, "d.bin") == 2
    assert blob_bytes(blob_service, container, "d.bin") == body


@pytest.mark.parametrize(("check", "refusal"), [("md5", "Md5Mismatch"), ("crc64", "Crc64Mismatch")])
async def test_damage_on_every_read_fails_and_commits_nothing(
    check: str,
    refusal: str,
    piping: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    an_object(s3_client, bucket, "bad.bin", check, 12 * MiB)
    async with FaultProxy(moto_endpoint, Faults(flip_period=3 * MiB)) as proxy:
        tuned = through(piping, proxy, retry={"attempts": 3})
        status, [row] = await copy(tuned, f"s3://{bucket}/bad.bin", f"az://{container}/bad.bin")
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and refusal in row.error and "3 attempts" in row.error
    assert gets(proxy, "bad.bin") == 3
    assert blob_names(blob_service, container) == []


@pytest.mark.parametrize("fault", ["reset", "stall", "upload stall"])
async def test_a_broken_stream_is_sent_again(
    fault: str,
    piping: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(16 * MiB, seed=7)
    s3_client.put_object(Bucket=bucket, Key="b.bin", Body=body)
    # S3's connection 1 is the HEAD, 2 the HEAD bucket that finds the bucket's region,
    # 3 the pipe's HEAD that times S3 (the first answer is no round trip: latency.py),
    # 4 the stream, which breaks 3 MiB in. Or the Put Blob's connection stops being
    # read 1 MiB in: 16 MiB is more than the sockets' buffers hold, so the sender
    # blocks, and only a deadline on progress sees it.
    s3_faults = {
        "reset": Faults(reset_every=4, reset_after=3 * MiB),
        "stall": Faults(stall_every=4, stall_after=3 * MiB),
    }.get(fault)
    azure_faults = (
        Faults(upload_stall_at=-1, upload_stall_after=MiB) if fault == "upload stall" else None
    )
    async with (
        FaultProxy(moto_endpoint, s3_faults) as s3p,
        FaultProxy(azurite_endpoint, azure_faults) as azp,
    ):
        tuned = through(
            piping,
            s3p,
            azure={"connection_string": SecretStr(connection_string(azp.endpoint))},
            retry={"stall_timeout_s": 1.0},
        )
        status, [row] = await asyncio.wait_for(
            copy(tuned, f"s3://{bucket}/b.bin", f"az://{container}/b.bin"), 60
        )
    assert s3p.resets + s3p.stalls + azp.upload_stalls == 1
    assert gets(s3p, "b.bin") == 2
    assert status == "done", row.error
    assert row.detail["route"] == "pipe"
    assert blob_bytes(blob_service, container, "b.bin") == body


async def test_kill_9_mid_pipe_commits_nothing_and_the_restart_copies(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(24 * MiB, seed=9)
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as proxy:
        env = daemon_env(settings, proxy.endpoint, azurite_endpoint, **PIPING)
        job = {"source": f"s3://{bucket}/k.bin", "destination": f"az://{container}/k.bin"}
        first = await start_mid_copy(env, settings.jobs_dir, "k", job, proxy, 8 * MiB)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        await asyncio.sleep(0.5)
        # Put Blob is all or nothing: half a body leaves no blob and no block behind.
        assert blob_names(blob_service, container) == []
        client = blob_service.get_blob_client(container, "k.bin")
        assert not client.exists()
        proxy.faults.rate_bps = None
        report = await restart_to_report(env, settings.jobs_dir, "k")
    assert report["folder"] == "done", report
    [t] = report["transfers"]
    assert t["route"] == "pipe"
    assert blob_bytes(blob_service, container, "k.bin") == body


async def test_sigterm_lets_a_pipe_in_flight_land(
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(16 * MiB, seed=10)
    s3_client.put_object(Bucket=bucket, Key="t.bin", Body=body)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as proxy:
        env = daemon_env(
            settings, proxy.endpoint, azurite_endpoint, **PIPING, BLOBFERRY_GRACE_PERIOD_S="20"
        )
        job = {"source": f"s3://{bucket}/t.bin", "destination": f"az://{container}/t.bin"}
        daemon = await start_mid_copy(env, settings.jobs_dir, "t", job, proxy, 4 * MiB)
        daemon.send_signal(signal.SIGTERM)  # about 3 s of the stream still to come
        out, _ = await daemon.communicate()
    assert daemon.returncode == 0
    events = [json.loads(line)["event"] for line in out.decode().splitlines()]
    assert "draining" in events and "copied" in events
    report = await wait_report(settings.jobs_dir, "t", timeout=1)
    assert report["folder"] == "done", report
    assert report["transfers"][0]["route"] == "pipe"
    assert blob_bytes(blob_service, container, "t.bin") == body


def test_round_trips_keep_the_fastest_recent_one(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("daemon.latency.time.monotonic", lambda: now[0])
    rt = RoundTrips(window_s=60)
    rt.record(0.001)  # the client's first answer: its connection, no figure of the link
    assert rt.near(1.0) is None
    rt.record(0.004)
    rt.record(0.002)
    rt.record(0.009)
    assert rt.near(0.002) is True and rt.near(0.0019) is False
    now[0] += 61  # a minute on, the link may have moved: measure again
    assert rt.near(1.0) is None
    rt.record(0.05)
    assert rt.near(0.05) is True


def test_round_trips_judge_far_on_three_slow_ones_and_near_on_one_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("daemon.latency.time.monotonic", lambda: now[0])
    rt = RoundTrips(window_s=60)
    assert rt.near(0.01) is None  # nothing seen
    rt.record(0.04)  # the client's first answer, not counted
    rt.record(0.05)
    rt.record(0.04)
    assert rt.near(0.01) is None  # two late answers: too few to call it far
    rt.record(0.03)
    assert rt.near(0.01) is False
    rt.record(0.002)
    assert rt.near(0.01) is True  # one fast answer shows the link is near
    now[0] += 61
    rt.record(0.002)
    assert rt.near(0.01) is True
