from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr

from daemon import app
from daemon.addresses import AzAddress, S3Address
from daemon.azure import AzureWriter
from daemon.blockcheck import BlockCheck, Kind, compute
from daemon.chunks import Chunks
from daemon.jobs import parse_job
from daemon.layout import plan_blocks
from daemon.records import TransferRow
from daemon.s3 import S3Reader
from daemon.settings import Settings
from tests.emulators import connection_string

MiB = 1024 * 1024


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes without holding a generator."""
    if n == 0:
        return b""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def blob_bytes(svc: BlobServiceClient, container: str, name: str) -> bytes:
    # decompress=False: a gzip-encoded blob must be compared as stored, not as served.
    return svc.get_blob_client(container, name).download_blob(decompress=False).readall()


def blob_md5(svc: BlobServiceClient, container: str, name: str) -> bytes | None:
    """The Content-MD5 the blob is stored with, if any."""
    props = svc.get_blob_client(container, name).get_blob_properties()
    md5 = props.content_settings.content_md5
    return bytes(md5) if md5 else None


def s3_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def azure_through(settings: Settings, endpoint: str, **changes: Any) -> Settings:
    """``settings`` reaching Azurite at ``endpoint`` (a fault proxy's), with ``changes``."""
    via = SecretStr(connection_string(endpoint))
    azure = settings.azure.model_copy(update={"connection_string": via})
    return settings.model_copy(update={"azure": azure, **changes})


def blob_names(svc: BlobServiceClient, container: str) -> list[str]:
    return sorted(b.name for b in svc.get_container_client(container).list_blobs())


async def copy(
    settings: Settings, source: str, destination: str, overwrite: str = "if-changed", **options: Any
) -> tuple[str, list[TransferRow]]:
    """The engine behind `blobferry copy`, in this process."""
    name = f"test-{os.urandom(4).hex()}"
    [spec] = parse_job(
        json.dumps(
            {"source": source, "destination": destination, "overwrite": overwrite, **options}
        )
    )
    status, state = await app.copy_once(settings, name, [spec], asyncio.Event())
    rows = list(state.transfers(name))
    state.close()
    return status, rows


def multipart_object(
    s3_client: Any, bucket: str, key: str, size: int, part: int, full: str | None = None
) -> bytes:
    """A multipart object of ``size`` bytes in parts of ``part``; with ``full`` (an
    algorithm, "CRC64NVME" say), S3 keeps that full-object checksum of it."""
    body = payload(size, seed=size)
    algo = {"ChecksumAlgorithm": full} if full else {}
    kind = {"ChecksumType": "FULL_OBJECT"} if full else {}
    mpu = s3_client.create_multipart_upload(Bucket=bucket, Key=key, **algo, **kind)
    parts = []
    for n, start in enumerate(range(0, size, part), 1):
        r = s3_client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=mpu["UploadId"],
            PartNumber=n,
            Body=body[start : start + part],
            **algo,
        )
        sums = {k: v for k, v in r.items() if k.startswith("Checksum") and k != "ChecksumType"}
        parts.append({"ETag": r["ETag"], "PartNumber": n, **sums})
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
    )
    return body


def staged_kinds(monkeypatch: pytest.MonkeyPatch) -> list[Kind]:
    """The check each block a copy stages carries (blockcheck.py), in staging order."""
    kinds: list[Kind] = []
    stage = AzureWriter.stage

    async def seen(self: AzureWriter, dst: AzAddress, i: str, d: Chunks, c: BlockCheck) -> None:
        kinds.append(c.kind)
        await stage(self, dst, i, d, c)

    monkeypatch.setattr(AzureWriter, "stage", seen)
    return kinds


async def stage_as_an_earlier_run(
    settings: Settings, bucket: str, key: str, container: str, count: int, kind: Kind
) -> None:
    """Stage the first ``count`` blocks of s3://bucket/key at az://container/key, named
    as blobferry names them, each carrying ``kind``: what a run cut short leaves."""
    dst = AzAddress(container, key)
    async with S3Reader(settings) as s3, AzureWriter(settings) as az:
        info = await s3.head(S3Address(bucket, key))
        plan = plan_blocks(info, settings.block_size)
        for block in plan.blocks[:count]:
            data = await s3.read_range(info, block.start, block.length)
            check = compute(kind, data)
            await az.stage(dst, plan.block_id(block.index, check.fingerprint), data, check)
