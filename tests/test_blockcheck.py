"""Which check each staged block carries (blockcheck.py): its CRC64 where the in-order
pass proves the object, its MD5 where the block MD5s are the proof; and blocks an
earlier blobferry staged under MD5 IDs are taken up by one that sends CRC64s."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.blockcheck import Kind, compute
from daemon.chunks import Chunks
from daemon.settings import Settings
from tests.helpers import (
    MiB,
    blob_bytes,
    blob_md5,
    copy,
    multipart_object,
    payload,
    stage_as_an_earlier_run,
    staged_kinds,
)


def test_the_crc_is_crc64_nvme_sent_little_endian() -> None:
    # The standard check value of CRC-64/NVME (the catalogue's "123456789"): the test
    # fails if awscrt's function ever computes another CRC under the same name.
    check = compute(Kind.CRC64, Chunks.of(bytearray(b"123456789")))
    assert check.fingerprint == (0xAE8B14860A799888).to_bytes(8, "little") + bytes(8)
    header = check.headers()["x-ms-content-crc64"]
    assert base64.b64decode(header) == (0xAE8B14860A799888).to_bytes(8, "little")
    assert check.md5 is None


@pytest.mark.parametrize(
    ("layout", "block_check", "content_md5", "sent", "verified"),
    [
        ("single-part", "crc64", True, {Kind.CRC64}, "etag"),
        ("single-part", "md5", True, {Kind.MD5}, "etag"),
        ("multipart", "crc64", True, {Kind.MD5}, "multipart-etag"),  # one block per part
        ("multipart-split", "crc64", True, {Kind.CRC64}, "multipart-etag"),  # parts cut
        ("multipart-split", "crc64", False, {Kind.CRC64}, "multipart-etag"),  # no whole MD5
    ],
)
async def test_each_block_carries_the_check_that_costs_least(
    layout: str,
    block_check: str,
    content_md5: bool,
    sent: set[Kind],
    verified: str,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if layout == "single-part":
        body = payload(5 * MiB, seed=3)
        s3_client.put_object(Bucket=bucket, Key="o.bin", Body=body)
    else:
        part = 8 * MiB if layout == "multipart" else 20 * MiB  # over 16 MiB: cut
        body = multipart_object(s3_client, bucket, "o.bin", 44 * MiB, part)
    kinds = staged_kinds(monkeypatch)
    azure = settings.azure.model_copy(update={"block_check": block_check})
    tuned = settings.model_copy(
        update={"azure": azure, "block_size_mb": 1, "pipe_max_mb": 0, "content_md5": content_md5}
    )
    status, [row] = await copy(tuned, f"s3://{bucket}/o.bin", f"az://{container}/o.bin")
    assert status == "done", row.error
    assert set(kinds) == sent and len(kinds) > 2
    assert row.detail["verified"] == verified
    assert blob_bytes(blob_service, container, "o.bin") == body
    want = hashlib.md5(body).digest() if content_md5 else None
    assert blob_md5(blob_service, container, "o.bin") == want


async def test_blocks_an_earlier_run_staged_under_md5_ids_are_taken_up(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """An upgrade between two runs of one transfer: the first staged blocks named by
    their MD5s, the second names the rest by their CRCs, and commits both."""
    body = payload(6 * MiB, seed=9)
    s3_client.put_object(Bucket=bucket, Key="r.bin", Body=body)
    tuned = settings.model_copy(update={"block_size_mb": 1, "pipe_max_mb": 0})
    await stage_as_an_earlier_run(tuned, bucket, "r.bin", container, 2, Kind.MD5)
    status, [row] = await copy(tuned, f"s3://{bucket}/r.bin", f"az://{container}/r.bin")
    assert status == "done", row.error
    assert row.detail["blocks_reused"] == 2
    assert blob_bytes(blob_service, container, "r.bin") == body
