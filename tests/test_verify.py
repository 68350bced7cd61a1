"""Every byte verified: damaged bytes from S3 are caught and re-read, never committed."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.blockcheck import Kind
from daemon.chunks import Chunks
from daemon.layout import Block, plan_layout
from daemon.objects import ObjectInfo
from daemon.settings import Settings
from daemon.verify import AZURE_CHECKED, AZURE_CHECKED_CRC64, InOrderDigest
from tests.helpers import (
    MiB,
    blob_bytes,
    blob_md5,
    blob_names,
    copy,
    multipart_object,
    payload,
    stage_as_an_earlier_run,
    staged_kinds,
)
from tests.proxy import FaultProxy, Faults
from tests.test_faults import through


@pytest.mark.parametrize(
    ("layout", "content_md5", "verified"),
    [
        ("single-part", True, "etag"),
        ("multipart", True, "multipart-etag"),
        ("multipart", False, "multipart-etag"),
        # Caught by the blocks' CRC64s put together, against S3's CRC64NVME.
        ("single-part-crc64nvme", True, "checksum-crc64nvme"),
    ],
    ids=["single-part", "multipart", "multipart-one-pass", "crc64nvme"],
)
async def test_a_flipped_byte_from_s3_is_caught_and_read_again(
    layout: str,
    content_md5: bool,
    verified: str,
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    size = 40 * MiB
    if layout == "multipart":
        body = multipart_object(s3_client, bucket, "f.bin", size, 8 * MiB)
    else:
        body = payload(size, seed=21)
        crc = {"ChecksumAlgorithm": "CRC64NVME"} if layout.endswith("crc64nvme") else {}
        s3_client.put_object(Bucket=bucket, Key="f.bin", Body=body, **crc)
    # One byte, deep inside the first block's body, flipped once on its way from S3.
    settings = settings.model_copy(update={"content_md5": content_md5})
    async with FaultProxy(moto_endpoint, Faults(flip_at=3 * MiB)) as proxy:
        status, [row] = await copy(
            through(settings, proxy), f"s3://{bucket}/f.bin", f"az://{container}/f.bin"
        )
    assert proxy.flips == 1
    assert status == "done", row.error
    assert row.detail["verified"] == verified
    assert row.detail["note"] == "1 block(s) arrived damaged from S3 and were read again"
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
        ("kms-crc64", "key"),
        ("kms-crc64", "prefix"),
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
    Content-MD5, or else S3's CRC64NVME as the CRC64, and Azure refuses the damage; the
    others are hashed here and caught."""
    size = 1 * MiB
    if layout == "multipart":  # one part: its ETag is "<MD5 of the part's MD5>-1"
        body = multipart_object(s3_client, bucket, "s/o.bin", size, 8 * MiB)
        verified = "multipart-etag"
    else:
        body = payload(size, seed=7)
        kms = (
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": s3_client_kms_key(s3_client)}
            if layout.startswith("kms")
            else {}
        )
        algorithm = "CRC64NVME" if layout == "kms-crc64" else "SHA256"
        extra = {"ChecksumAlgorithm": algorithm} if kms else {}
        s3_client.put_object(Bucket=bucket, Key="s/o.bin", Body=body, **kms, **extra)
        verified = {"kms": "checksum-sha256", "kms-crc64": AZURE_CHECKED_CRC64}.get(
            layout, AZURE_CHECKED
        )
    source = f"s3://{bucket}/s/" if via == "prefix" else f"s3://{bucket}/s/o.bin"
    destination = f"az://{container}/s/" if via == "prefix" else f"az://{container}/s/o.bin"
    async with FaultProxy(moto_endpoint, Faults(flip_at=size // 2)) as proxy:
        status, [row] = await copy(through(settings, proxy), source, destination)
    assert proxy.flips == 1
    assert status == "done", row.error
    assert (row.detail["route"], row.detail["verified"]) == ("whole", verified)
    assert row.detail["note"] == "the bytes arrived damaged 1 time(s); read and sent again"
    assert blob_bytes(blob_service, container, "s/o.bin") == body
    assert blob_md5(blob_service, container, "s/o.bin") == hashlib.md5(body).digest()


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


@pytest.mark.parametrize(
    ("layout", "content_md5", "md5_pass"),
    [
        ("single-part", True, False),  # the blob's Content-MD5 is the ETag: nothing hashed
        ("multipart", False, False),  # parts of 20 MiB, cut into blocks
        ("multipart", True, True),  # a multipart ETag is no MD5: Content-MD5 costs a pass
        ("one-block-per-part", False, False),  # CRC64s, not the part MD5s
    ],
)
async def test_s3s_crc64nvme_proves_the_copy_from_the_blocks_own_crcs(
    layout: str,
    content_md5: bool,
    md5_pass: bool,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CRC64NVME real S3 keeps of every object uploaded without a checksum of its
    own since December 2024 (and of those uploaded with one), put together from the
    CRC64s Azure checked each block against: no byte is hashed in object order."""
    if layout == "single-part":
        body = payload(9 * MiB + 5, seed=11)
        s3_client.put_object(Bucket=bucket, Key="n.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    else:  # parts over 16 MiB are cut into blocks; smaller ones are a block each
        part = 20 * MiB if layout == "multipart" else 8 * MiB
        body = multipart_object(s3_client, bucket, "n.bin", 45 * MiB, part, "CRC64NVME")
    passes = _digests(monkeypatch)
    kinds = staged_kinds(monkeypatch)
    tuned = settings.model_copy(
        update={"block_size_mb": 4, "pipe_max_mb": 0, "content_md5": content_md5}
    )
    status, [row] = await copy(tuned, f"s3://{bucket}/n.bin", f"az://{container}/n.bin")
    assert status == "done", row.error
    assert (row.detail["route"], row.detail["verified"]) == ("blocks", "checksum-crc64nvme")
    assert blob_bytes(blob_service, container, "n.bin") == body
    assert set(kinds) == {Kind.CRC64} and len(kinds) > 2
    assert [d.whole is not None for d in passes] == ([True] if md5_pass else [])
    assert not any(d.checksum or d.parts for d in passes)
    want = hashlib.md5(body).digest() if content_md5 else None
    assert blob_md5(blob_service, container, "n.bin") == want


async def test_a_crc32_proves_a_single_part_copy_with_no_md5_computed(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An object uploaded with a CRC32 (boto3's default since 1.36): the in-order pass
    computes that, a tenth of an MD5's CPU, and the ETag is the blob's Content-MD5."""
    body = payload(9 * MiB, seed=12)
    s3_client.put_object(Bucket=bucket, Key="c.bin", Body=body, ChecksumAlgorithm="CRC32")
    passes = _digests(monkeypatch)
    tuned = settings.model_copy(update={"block_size_mb": 4, "pipe_max_mb": 0})
    status, [row] = await copy(tuned, f"s3://{bucket}/c.bin", f"az://{container}/c.bin")
    assert status == "done", row.error
    assert row.detail["verified"] == "checksum-crc32"
    assert [(d.whole, d.checksum and d.checksum.algorithm) for d in passes] == [(None, "crc32")]
    assert blob_md5(blob_service, container, "c.bin") == hashlib.md5(body).digest()
    assert blob_bytes(blob_service, container, "c.bin") == body


async def test_a_crc32_of_the_whole_proves_a_multipart_copy_in_place_of_the_part_md5s(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parts cut into blocks, and S3 holds a full-object CRC32: the pass computes that,
    not the part MD5s the composite ETag would need (and no whole MD5, unasked)."""
    body = multipart_object(s3_client, bucket, "m.bin", 45 * MiB, 20 * MiB, "CRC32")
    passes = _digests(monkeypatch)
    tuned = settings.model_copy(update={"block_size_mb": 4, "pipe_max_mb": 0, "content_md5": False})
    status, [row] = await copy(tuned, f"s3://{bucket}/m.bin", f"az://{container}/m.bin")
    assert status == "done", row.error
    assert row.detail["verified"] == "checksum-crc32"
    made = [(d.whole, d.parts, d.checksum and d.checksum.algorithm) for d in passes]
    assert made == [(None, False, "crc32")]
    assert blob_bytes(blob_service, container, "m.bin") == body


async def test_a_resumed_copy_is_proven_by_the_crcs_of_blocks_staged_before(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Blocks an earlier run staged are not read again, and their CRC64s, kept in their
    IDs, still count: the resumed copy is proven, where an MD5 could not be had."""
    body = payload(7 * MiB + 3, seed=14)
    s3_client.put_object(Bucket=bucket, Key="r.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    tuned = settings.model_copy(update={"block_size_mb": 1, "pipe_max_mb": 0})
    await stage_as_an_earlier_run(tuned, bucket, "r.bin", container, 3, Kind.CRC64)
    status, [row] = await copy(tuned, f"s3://{bucket}/r.bin", f"az://{container}/r.bin")
    assert status == "done", row.error
    assert (row.detail["blocks_reused"], row.detail["verified"]) == (3, "checksum-crc64nvme")
    assert blob_bytes(blob_service, container, "r.bin") == body


def test_the_blocks_crcs_put_together_are_the_objects_crc64nvme() -> None:
    import base64

    from awscrt import checksums

    from daemon.blockcheck import compute, crc64_of
    from daemon.errors import VerificationError
    from daemon.verify import Checksum, verify

    data = payload(3 * MiB + 12_345, seed=15)
    info = ObjectInfo("b", "k", len(data), '"' + "ab" * 16 + '"')
    plan = plan_layout(info, MiB, None)
    crcs = [
        crc64_of(
            compute(
                Kind.CRC64, Chunks.of(bytearray(data[b.start : b.start + b.length]))
            ).fingerprint
        )
        for b in plan.blocks
    ]
    whole = base64.b64encode(checksums.crc64nvme(data).to_bytes(8, "big")).decode()
    right = ObjectInfo(info.bucket, info.key, info.size, info.etag, checksums={"crc64nvme": whole})
    combined = Checksum.of_blocks(right, plan, crcs)
    assert combined is not None and combined.value() == whole
    assert verify(right, None, None, combined) == "checksum-crc64nvme"
    wrong = ObjectInfo(
        info.bucket, info.key, info.size, info.etag, checksums={"crc64nvme": "A" * 11 + "="}
    )
    with pytest.raises(VerificationError, match="CRC64NVME of the bytes read"):
        verify(wrong, None, None, Checksum.of_blocks(wrong, plan, crcs))
    # Not put together: a block staged under its MD5, an unknown one, or S3's composite.
    assert crc64_of(hashlib.md5(b"x").digest()) is None
    assert Checksum.of_blocks(right, plan, [None, *crcs[1:]]) is None
    composite = ObjectInfo(
        info.bucket,
        info.key,
        info.size,
        info.etag,
        checksums={"crc64nvme": whole},
        checksum_type="COMPOSITE",
    )
    assert Checksum.of_blocks(composite, plan, crcs) is None
    untyped = ObjectInfo(
        info.bucket, info.key, info.size, info.etag, checksums={"crc64nvme": whole + "-3"}
    )
    assert Checksum.of_blocks(untyped, plan, crcs) is None


def _digests(monkeypatch: pytest.MonkeyPatch) -> list[InOrderDigest]:
    """Each in-order pass a copy makes, as it is made."""
    made: list[InOrderDigest] = []
    init = InOrderDigest.__init__

    def record(self: InOrderDigest, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(InOrderDigest, "__init__", record)
    return made
