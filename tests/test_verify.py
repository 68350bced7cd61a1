"""Every byte verified: damaged bytes from S3 are caught and re-read, never committed."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.chunks import Chunks
from daemon.layout import Block, plan_layout
from daemon.objects import ObjectInfo
from daemon.settings import Settings
from daemon.verify import AZURE_CHECKED, InOrderDigest
from tests.helpers import MiB, blob_bytes, blob_names, copy, multipart_object, payload
from tests.proxy import FaultProxy, Faults
from tests.test_faults import through


@pytest.mark.parametrize(
    ("multipart", "content_md5"),
    [(False, True), (True, True), (True, False)],
    ids=["single-part", "multipart", "multipart-one-pass"],
)
async def test_a_flipped_byte_from_s3_is_caught_and_read_again(
    multipart: bool,
    content_md5: bool,
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    size = 40 * MiB
    if multipart:
        body = multipart_object(s3_client, bucket, "f.bin", size, 8 * MiB)
    else:
        body = payload(size, seed=21)
        s3_client.put_object(Bucket=bucket, Key="f.bin", Body=body)
    # One byte, deep inside the first block's body, flipped once on its way from S3.
    settings = settings.model_copy(update={"content_md5": content_md5})
    async with FaultProxy(moto_endpoint, Faults(flip_at=3 * MiB)) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/f.bin", f"az://{container}/f.bin"
        )
    assert proxy.flips == 1
    assert status == "done", row.error
    assert row.detail["verified"] == ("multipart-etag" if multipart else "etag")
    assert "1 block(s) arrived damaged" in row.detail["note"]
    assert blob_bytes(blob_service, container, "f.bin") == body


@pytest.mark.parametrize("content_md5", [True, False])
async def test_a_multipart_blob_carries_its_md5_unless_told_not_to(
    content_md5: bool,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    body = multipart_object(s3_client, bucket, "m.bin", 20 * MiB, 8 * MiB)
    settings = settings.model_copy(update={"content_md5": content_md5})
    status, [row] = await copy(settings, f"s3://{bucket}/m.bin", f"az://{container}/m.bin")
    assert status == "done", row.error
    # Proven either way: each part is one block, whose MD5 Azure checked on arrival.
    assert row.detail["verified"] == "multipart-etag"
    assert blob_bytes(blob_service, container, "m.bin") == body
    props = blob_service.get_blob_client(container, "m.bin").get_blob_properties()
    stored = props.content_settings.content_md5
    if content_md5:
        assert stored is not None and bytes(stored) == hashlib.md5(body).digest()
    else:
        assert stored is None


async def test_damage_on_every_read_fails_without_committing(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="g.bin", Body=payload(20 * MiB, seed=4))

    # A byte damaged in every MiB of every response: the re-read is damaged too.
    async with FaultProxy(moto_endpoint, Faults(flip_period=1 * MiB)) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/g.bin", f"az://{container}/g.bin"
        )
    assert proxy.flips > 20
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and "MD5 of the bytes read" in row.error
    assert not blob_service.get_blob_client(container, "g.bin").exists()


@pytest.mark.parametrize(
    ("layout", "via"),
    [
        ("single-part", "prefix"),
        ("single-part", "key"),
        ("multipart", "prefix"),
        ("kms", "key"),
        ("kms", "prefix"),  # a listing says nothing of SSE: the GET does
    ],
)
async def test_a_small_objects_damaged_bytes_are_read_and_sent_again(
    layout: str,
    via: str,
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """One GET, one Put Blob, retried together. A single-part object's ETag goes as the
    Content-MD5 and Azure refuses the damage; the others are hashed here and caught."""
    size = 1 * MiB
    if layout == "multipart":  # one part: its ETag is "<MD5 of the part's MD5>-1"
        body = multipart_object(s3_client, bucket, "s/o.bin", size, 8 * MiB)
        verified = "multipart-etag"
    else:
        body = payload(size, seed=7)
        kms = (
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": s3_client_kms_key(s3_client)}
            if layout == "kms"
            else {}
        )
        extra = {"ChecksumAlgorithm": "SHA256"} if kms else {}
        s3_client.put_object(Bucket=bucket, Key="s/o.bin", Body=body, **kms, **extra)
        verified = "checksum-sha256" if kms else AZURE_CHECKED
    source = f"s3://{bucket}/s/" if via == "prefix" else f"s3://{bucket}/s/o.bin"
    destination = f"az://{container}/s/" if via == "prefix" else f"az://{container}/s/o.bin"
    async with FaultProxy(moto_endpoint, Faults(flip_at=size // 2)) as proxy:
        status, [row] = await copy(through(settings, proxy), source, destination)
    assert proxy.flips == 1
    assert status == "done", row.error
    assert (row.detail["route"], row.detail["verified"]) == ("whole", verified)
    assert "arrived damaged 1 time(s)" in row.detail["note"]
    assert blob_bytes(blob_service, container, "s/o.bin") == body


async def test_a_listed_encrypted_object_that_changes_before_its_checksum_is_read_fails(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A listed SSE-KMS object is read by one GET, then its checksum by one HEAD. A
    new version landing in between must not lend its checksum to the old bytes."""
    kms = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": s3_client_kms_key(s3_client)}
    put = dict(Bucket=bucket, Key="c/o.bin", ChecksumAlgorithm="SHA256", **kms)
    s3_client.put_object(Body=payload(MiB, seed=1), **put)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=400_000)) as proxy:
        job = asyncio.create_task(
            copy(through(settings, proxy), f"s3://{bucket}/c/", f"az://{container}/c/")
        )
        while proxy.bytes_down < 200_000:  # the GET is under way
            assert not job.done(), job.result()
            await asyncio.sleep(0.02)
        await asyncio.to_thread(s3_client.put_object, Body=payload(MiB, seed=2), **put)
        status, [row] = await job
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and "changed while it was being copied" in row.error
    assert blob_names(blob_service, container) == []
    # Told by the HEAD's ETag at once, not by a checksum mismatch and a second GET.
    assert sum(r.startswith("GET") and "/c/o.bin" in r for r in proxy.requests) == 1


async def test_a_small_object_damaged_on_every_read_fails_without_committing(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="h.bin", Body=payload(MiB, seed=5))
    async with FaultProxy(moto_endpoint, Faults(flip_period=256 * 1024)) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/h.bin", f"az://{container}/h.bin"
        )
    assert proxy.flips >= 3 * settings.retry.attempts
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and "Md5Mismatch" in row.error
    assert not blob_service.get_blob_client(container, "h.bin").exists()


async def test_s3_checksum_proves_the_copy_when_the_etag_cannot(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """An SSE-KMS object's ETag is not an MD5: its CRC32 or SHA-256 checksum serves."""
    kms = s3_client_kms_key(s3_client)
    cases = (
        ("crc.bin", "CRC32", 9 * MiB + 1),
        ("crcc.bin", "CRC32C", 5 * MiB),
        ("nvme.bin", "CRC64NVME", 6 * MiB + 7),
        ("sha.bin", "SHA256", 1000),
        ("sha1.bin", "SHA1", 4 * MiB + 3),
    )
    for key, algorithm, size in cases:
        body = payload(size, seed=size)
        s3_client.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ChecksumAlgorithm=algorithm,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=kms,
        )
        status, [row] = await copy(settings, f"s3://{bucket}/{key}", f"az://{container}/{key}")
        assert status == "done", row.error
        assert row.detail["verified"] == f"checksum-{algorithm.lower()}"
        assert blob_bytes(blob_service, container, key) == body


def test_a_checksum_mismatch_is_caught() -> None:
    from daemon.chunks import Chunks
    from daemon.errors import VerificationError
    from daemon.objects import ObjectInfo
    from daemon.verify import Checksum, verify

    info = ObjectInfo(
        bucket="bkt",
        key="k",
        size=3,
        etag='"x"',
        sse="aws:kms",
        checksums={"crc32": "AAAAAA=="},
        checksum_type="FULL_OBJECT",
    )
    checksum = Checksum.for_object(info)
    assert checksum is not None
    checksum.update(Chunks([b"abc"]))
    with pytest.raises(VerificationError, match="CRC32 of the bytes read"):
        verify(info, None, None, checksum)


def s3_client_kms_key(s3_client: Any) -> str:
    import boto3

    kms = boto3.client("kms", endpoint_url=s3_client.meta.endpoint_url, region_name="us-east-1")
    return str(kms.create_key()["KeyMetadata"]["KeyId"])


async def test_blocks_arriving_in_any_order_are_hashed_in_object_order() -> None:
    """The in-order pass, fed as blocks land (in any order, each waiting for its turn):
    the whole MD5 and each part's MD5 as if read front to back."""
    parts = [17 * MiB + 3, 18 * MiB, 2 * MiB - 1]  # over 16 MiB, a part is cut in blocks
    data = payload(sum(parts), seed=4)
    info = ObjectInfo("b", "k.bin", len(data), '"' + "cd" * 16 + '-3"')
    plan = plan_layout(info, 4 * MiB, parts)
    assert len(plan.blocks) > len(parts)
    digest = InOrderDigest(plan)
    order = list(plan.blocks)
    random.Random(7).shuffle(order)

    async def land(block: Block, delay: float) -> None:
        await asyncio.sleep(delay)
        chunk = bytearray(data[block.start : block.start + block.length])
        await digest.feed(block, Chunks.of(chunk), None)

    async with asyncio.TaskGroup() as tg:
        for n, block in enumerate(order):
            tg.create_task(land(block, n * 0.002))
    assert digest.whole is not None and digest.whole.digest() == hashlib.md5(data).digest()
    at = 0
    wanted = []
    for size in parts:
        wanted.append(hashlib.md5(data[at : at + size]).digest())
        at += size
    assert digest.part_digests == wanted
