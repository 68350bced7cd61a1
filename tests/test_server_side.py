"""Server-side mode: Azure fetches each block itself (Put Block From URL).

Azurite fetches only from its own blobs, so the path that succeeds is tested with an
Azurite-hosted source URL standing in for the presigned S3 range; the S3 side (a fresh
presigned URL per block) is checked on its own, and a real S3 URL shows the fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas
from azure.storage.blob._blob_client_helpers import _encode_source_url
from yarl import URL

from daemon.addresses import S3Address
from daemon.azure import AzureWriter
from daemon.budget import Budget
from daemon.errors import Interrupted, RetriesExhaustedError, SourceChangedError
from daemon.jobs import parse_job
from daemon.objects import ObjectInfo
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.transfer import Copier
from daemon.verify import SERVER_SIDE_CHECKED
from tests.emulators import AZURITE_KEY
from tests.helpers import MiB, azure_through, blob_bytes, blob_names, copy, payload
from tests.proxy import FaultProxy


def _azurite_url(blob_service: BlobServiceClient, container: str, name: str, body: bytes) -> str:
    """A URL Azurite can fetch from itself, holding ``body``: the stand-in for S3's."""
    client = blob_service.get_blob_client(container, name)
    client.upload_blob(body)
    sas = generate_blob_sas(
        "devstoreaccount1",
        container,
        name,
        account_key=AZURITE_KEY,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.now(UTC) + timedelta(minutes=5),
    )
    return f"{client.url}?{sas}"


async def test_blocks_are_fetched_by_azure_from_a_url_it_can_reach(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(20 * MiB + 5, seed=31)
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=body, ContentType="x/y")
    source_url = _azurite_url(blob_service, container, "source.bin", body)
    asked: list[str] = []

    async def urls(info: ObjectInfo) -> str:
        asked.append(info.key)
        return source_url

    [spec] = parse_job(
        f'{{"source": "s3://{bucket}/obj.bin", "destination": "az://{container}/copy.bin", "mode": "server-side"}}'
    )
    async with S3Reader(settings) as s3, AzureWriter(settings) as az:
        budget = Budget(settings.memory_bytes)
        outcome = await Copier(settings, s3, az, budget, source_urls=urls).copy(spec)
    assert outcome.status == "copied"
    assert outcome.verified is not None and outcome.verified.startswith("size: server-side")
    assert len(asked) == -(-len(body) // settings.block_size)  # a fresh URL for each block
    assert budget.peak == 0  # not one payload byte was buffered here
    assert blob_bytes(blob_service, container, "copy.bin") == body
    props = blob_service.get_blob_client(container, "copy.bin").get_blob_properties()
    assert props.content_settings.content_type == "x/y"


async def test_unreachable_source_falls_back_to_streaming_and_says_so(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = payload(20 * MiB, seed=32)
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=body)
    server_side = settings.model_copy(update={"mode": "server-side"})
    status, [row] = await copy(server_side, f"s3://{bucket}/obj.bin", f"az://{container}/obj.bin")
    assert status == "done", row.error
    assert "server-side copy impossible" in row.detail["note"]
    assert "CannotVerifyCopySource" in row.detail["note"]
    assert row.detail["verified"] == "etag"
    assert blob_bytes(blob_service, container, "obj.bin") == body


async def test_each_presigned_url_is_fresh_and_short_lived(settings: Settings, bucket: str) -> None:
    short = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"presign_expires_s": 60})}
    )
    info = ObjectInfo(bucket=bucket, key="k.bin", size=1, etag='"x"')
    async with S3Reader(short) as s3:
        first = await s3.presign(info)
        await asyncio.sleep(1.1)
        second = await s3.presign(info)
    q1, q2 = (parse_qs(urlsplit(u).query) for u in (first, second))
    assert q1["X-Amz-Expires"] == ["60"] and q1["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert q1["X-Amz-Date"] != q2["X-Amz-Date"] and q1["X-Amz-Signature"] != q2["X-Amz-Signature"]
    assert urlsplit(first).path == f"/{bucket}/k.bin"


async def test_a_small_object_is_fetched_by_azure_and_checked_against_its_md5(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """An object of one block goes server-side too (it used to pass through here), and
    Azure checks the bytes it fetched against the ETag: a URL serving other bytes of
    the same size is refused on every attempt and nothing is committed."""
    body = payload(300 * 1024, seed=33)
    s3_client.put_object(Bucket=bucket, Key="small.bin", Body=body, ContentType="x/small")
    for source, bytes_there in (("good", body), ("bad", payload(len(body), seed=34))):
        url = _azurite_url(blob_service, container, f"{source}-source.bin", bytes_there)

        async def urls(info: ObjectInfo, url: str = url) -> str:
            return url

        [spec] = parse_job(
            f'{{"source": "s3://{bucket}/small.bin", "destination": "az://{container}/{source}",'
            ' "mode": "server-side"}'
        )
        async with S3Reader(settings) as s3, AzureWriter(settings) as az:
            budget = Budget(settings.memory_bytes)
            copier = Copier(settings, s3, az, budget, source_urls=urls)
            if source == "good":
                outcome = await copier.copy(spec)
                assert (outcome.status, outcome.route) == ("copied", "server-side")
                assert outcome.verified == SERVER_SIDE_CHECKED
                assert budget.peak == 0
            else:
                with pytest.raises(RetriesExhaustedError, match="Md5Mismatch"):
                    await copier.copy(spec)
    assert blob_bytes(blob_service, container, "good") == body
    props = blob_service.get_blob_client(container, "good").get_blob_properties()
    assert props.content_settings.content_type == "x/small"
    assert bytes(props.content_settings.content_md5) == hashlib.md5(body).digest()
    assert "bad" not in blob_names(blob_service, container)


async def test_a_prefix_azure_cannot_fetch_from_is_asked_once_then_streamed_whole(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Azure (Azurite) cannot fetch from S3 (moto), as behind a VPC-endpoint policy.
    The first object finds that out; the rest of the bucket's objects stream at once,
    small ones in one Put Blob each, and every report says why."""
    objects = {f"p/{n}.bin": payload(n * 1000, seed=n) for n in range(5)}  # 0 bytes first
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    async with FaultProxy(azurite_endpoint) as azp:
        one_at_a_time = azure_through(settings, azp.endpoint, mode="server-side", max_transfers=1)
        status, rows = await copy(one_at_a_time, f"s3://{bucket}/p/", f"az://{container}/q/")
    assert status == "done", [r.error for r in rows]
    assert sum("comp=block&" in r for r in azp.requests) == 1  # the one attempt
    for row in rows:
        assert row.detail["route"] == "whole"
        if row.bytes_done:  # an empty object has no block to fetch: it goes whole
            assert "server-side copy impossible" in row.detail["note"], row.detail
    for key, body in objects.items():
        assert blob_bytes(blob_service, container, "q/" + key[2:]) == body


async def test_a_server_side_copy_stopped_halfway_resumes_from_the_blocks_azure_holds(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A drain lets the blocks in flight land (they were cancelled) and starts no more;
    the next run fetches only what Azure does not hold."""
    body = payload(24 * MiB + 7, seed=35)  # seven blocks
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=body)
    source_url = _azurite_url(blob_service, container, "source.bin", body)
    stopping = asyncio.Event()
    asked = 0
    tasks: list[int] = []  # how many tasks there are as each block starts

    async def urls(info: ObjectInfo) -> str:
        nonlocal asked
        asked += 1
        tasks.append(len(asyncio.all_tasks()))
        if asked == 3:
            stopping.set()  # a drain begins: blocks in flight land, no new one starts
        return source_url

    [spec] = parse_job(
        f'{{"source": "s3://{bucket}/obj.bin", "destination": "az://{container}/copy.bin",'
        ' "mode": "server-side"}'
    )
    narrow = settings.model_copy(update={"block_concurrency": 2})
    async with S3Reader(settings) as s3, AzureWriter(settings) as az:
        budget = Budget(settings.memory_bytes)
        before = len(asyncio.all_tasks())
        with pytest.raises(Interrupted):
            await Copier(narrow, s3, az, budget, source_urls=urls, stopping=stopping).copy(spec)
        # A task per lane, not per block: a 50,000-block object made 50,000 at once.
        assert max(tasks) - before <= 2
        client = blob_service.get_blob_client(container, "copy.bin")
        uncommitted = client.get_block_list("uncommitted")[1]
        staged = len(uncommitted)
        assert 0 < staged < 7 and asked == staged
        asked = 0
        done: list[tuple[int, bool]] = []

        def progress(n: int, *, reused: bool = False) -> None:
            done.append((n, reused))

        outcome = await Copier(settings, s3, az, budget, source_urls=urls).copy(
            spec, progress=progress
        )
    assert (outcome.status, outcome.route, outcome.blocks_reused) == (
        "copied",
        "server-side",
        staged,
    )
    assert asked == 7 - staged  # only the blocks Azure did not hold were fetched
    # The blocks Azure held are done, as reused (no rate counts them); the rest moved.
    reused = [n for n, was_reused in done if was_reused]
    assert len(reused) == 1 and sum(n for n, _ in done) == len(body)
    assert reused[0] == sum(b.size for b in uncommitted)
    assert blob_bytes(blob_service, container, "copy.bin") == body


async def test_an_object_written_over_at_the_same_size_mid_copy_is_never_committed_as_a_mix(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Azure fetches each block with a URL of its own, and no If-Match can go with its
    GETs. Half-way, the object is written over at the same size (in S3, and in the
    Azurite blob standing in for S3's bytes): the blocks after come from the new
    version. Its ETag, asked again before the commit, is not the one the copy began
    with: nothing is committed, and the reason says the source changed."""
    old, new = payload(12 * MiB, seed=41), payload(12 * MiB, seed=42)
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=old)
    source = blob_service.get_blob_client(container, "source.bin")
    url = _azurite_url(blob_service, container, "source.bin", old)
    asked = 0

    async def urls(info: ObjectInfo) -> str:
        nonlocal asked
        asked += 1
        if asked == 2:  # after the first block: a writer replaces the object
            s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=new)
            source.upload_blob(new, overwrite=True)
        return url

    one_lane = settings.model_copy(update={"block_concurrency": 1})
    [spec] = parse_job(
        f'{{"source": "s3://{bucket}/obj.bin", "destination": "az://{container}/copy.bin", "mode": "server-side"}}'
    )
    async with S3Reader(one_lane) as s3, AzureWriter(one_lane) as az:
        copier = Copier(one_lane, s3, az, Budget(one_lane.memory_bytes), source_urls=urls)
        with pytest.raises(SourceChangedError, match="changed while it was being copied"):
            await copier.copy(spec)
    assert asked == 3
    assert "copy.bin" not in blob_names(blob_service, container)


async def test_a_versioned_objects_urls_read_its_version_whatever_is_written_over_it(
    settings: Settings, moto_endpoint: str, s3_client: Any, bucket: str
) -> None:
    """Where the bucket keeps versions, each URL Azure is given names the version the
    copy began with (versionId, signed): a later write changes nothing it reads, and
    so no HEAD is needed before the commit. Checked against the strict S3 front, as
    Azure would fetch it."""
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=bucket, Key="v.bin", Body=b"first version")
    async with S3Reader(settings) as s3:
        info = await s3.head(S3Address(bucket, "v.bin"))
        assert info.version_id
        s3_client.put_object(Bucket=bucket, Key="v.bin", Body=b"later version")
        url = await s3.presign(info)
    assert f"versionId={info.version_id}" in url
    assert _encode_source_url(url) == url  # what the SDK hands Azure is what was signed
    async with aiohttp.ClientSession() as http, http.get(URL(url, encoded=True)) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == b"first version"
