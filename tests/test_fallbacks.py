"""The settings that step back from the SDK detours to the libraries' own paths.

``s3.local_signing = false``: botocore presigns every range GET (checked by the strict
S3 front like any other). ``azure.direct = false``: Put Blob, Put Block and Get Blob
Properties go through the SDK, Azure still checking every body against its MD5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from tests.conftest import make_settings
from tests.helpers import MiB, blob_bytes, copy, payload
from tests.proxy import FaultProxy, Faults
from tests.strict_s3 import StrictS3
from tests.test_strict_s3 import HOSTILE


@pytest.mark.parametrize("size", [3000, 3 * MiB + 5], ids=["whole", "blocks"])
async def test_with_both_detours_off_every_route_copies(
    size: int,
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    strict_s3: StrictS3,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    settings = make_settings(
        tmp_path,
        moto_endpoint,
        azurite_endpoint,
        block_size_mb=1,
        pipe_max_mb=64,  # would pipe, but the SDK cannot stream a body: blocks instead
        s3={"endpoint_url": moto_endpoint, "local_signing": False},
    )
    settings = settings.model_copy(
        update={"azure": settings.azure.model_copy(update={"direct": False})}
    )
    keys = HOSTILE[:6]
    for n, key in enumerate(keys):
        s3_client.put_object(Bucket=bucket, Key=f"in/{key}", Body=payload(size, seed=n))
    refused = len(strict_s3.tally.refused)
    status, rows = await copy(settings, f"s3://{bucket}/in/", f"az://{container}/out/")
    assert status == "done", [r.error for r in rows if r.error]
    assert len(strict_s3.tally.refused) == refused
    assert {r.detail["route"] for r in rows} == {"whole" if size < MiB else "blocks"}
    for n, key in enumerate(keys):
        assert blob_bytes(blob_service, container, f"out/{key}") == payload(size, seed=n)
    # Copied again: each blob's properties read through the SDK say it is this version.
    status, rows = await copy(settings, f"s3://{bucket}/in/", f"az://{container}/out/")
    assert status == "done" and {r.status for r in rows} == {"skipped"}


@pytest.mark.parametrize("path", ["sdk", "aiohttp", "http1"])
@pytest.mark.parametrize("check", ["crc64", "md5"])
async def test_azure_refuses_damaged_bytes_by_either_check_on_every_path(
    path: str,
    check: str,
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A byte flipped on the way to Azure: Put Block carries the block's CRC64 or MD5
    (azure.block_check), through the SDK, aiohttp or http1.py, Azure refuses it, and the
    block is sent again."""
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=payload(3 * MiB, seed=7))
    async with FaultProxy(azurite_endpoint, Faults(upload_flip_at=MiB + 10)) as flipping:
        settings = make_settings(
            tmp_path, moto_endpoint, flipping.endpoint, block_size_mb=1, pipe_max_mb=0
        )
        settings = settings.model_copy(
            update={
                "azure": settings.azure.model_copy(
                    update={
                        "direct": path != "sdk",
                        "direct_writes": path == "http1",
                        "block_check": check,
                    }
                )
            }
        )
        status, [row] = await copy(settings, f"s3://{bucket}/obj.bin", f"az://{container}/o.bin")
    assert status == "done", row.error
    assert flipping.flips == 1
    assert blob_bytes(blob_service, container, "o.bin") == payload(3 * MiB, seed=7)
