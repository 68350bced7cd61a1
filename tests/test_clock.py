"""A machine whose clock is off: S3 and Azure refuse every request signed more than
15 minutes off their time, naming a credential, an expired URL, or (a HEAD) nothing.
The refusal names the clock instead, at once, without retrying, and lands nothing."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.clock import ClockSkewError, skew
from daemon.settings import Settings
from tests.helpers import MiB, azure_through, blob_names, copy, payload
from tests.proxy import FaultProxy, Faults
from tests.test_faults import through


def test_skew_is_read_from_a_date_header() -> None:
    assert skew(formatdate(1_000_000 + 1800, usegmt=True), now=1_000_000) == 1800
    assert skew("Mon, 02 Jan 2006 15:04:05 GMT", now=1136214245 + 60) == -60
    assert skew(None) is None and skew("yesterday") is None and skew("") is None
    ahead = str(ClockSkewError("GET s3://b/k", "S3", -3 * 3600))
    assert "this machine's clock is 3.0 hours ahead of S3's" in ahead
    assert "31 minutes behind Azure's" in str(ClockSkewError("x", "Azure", 1860))


@pytest.mark.parametrize(
    ("offset", "judged", "said"),
    [
        (1800, b"", "30 minutes behind S3's"),  # every request: a HEAD's bare 403 first
        (1800, b"X-Amz-Expires", "30 minutes behind S3's"),  # presigned: expired on arrival
        (-1800, b"X-Amz-Expires", "30 minutes ahead of S3's"),  # presigned: not valid yet
    ],
)
async def test_a_clock_off_s3s_is_named_and_not_retried(
    offset: float,
    judged: bytes,
    said: str,
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k", Body=payload(3 * MiB, seed=1))
    faults = Faults(clock_offset_s=offset, clock_match=judged)
    async with FaultProxy(moto_endpoint, faults) as proxy:
        status, rows = await copy(
            through(settings, proxy), f"s3://{bucket}/k", f"az://{container}/k"
        )
    assert status == "failed"
    [row] = rows
    assert said in str(row.error), row.error
    assert "Set the clock right" in str(row.error)
    assert proxy.expired == 1  # refused once: a wrong clock is not a passing fault
    assert blob_names(blob_service, container) == []


@pytest.mark.parametrize("offset", [1800, -7200])
async def test_a_clock_off_azures_is_named_and_not_retried(
    offset: float,
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Azure's refusal is AuthenticationFailed, the same as a wrong key's; its Date
    tells them apart. The small object goes as one Put Blob, the larger in blocks."""
    s3_client.put_object(Bucket=bucket, Key="src/small", Body=payload(MiB // 2, seed=2))
    s3_client.put_object(Bucket=bucket, Key="src/large", Body=payload(3 * MiB, seed=3))
    faults = Faults(clock_offset_s=offset)
    async with FaultProxy(azurite_endpoint, faults) as proxy:
        tuned = azure_through(settings, proxy.endpoint, block_size_mb=1)
        status, rows = await copy(tuned, f"s3://{bucket}/src/", f"az://{container}/dst/")
    assert status == "failed"
    said = "30 minutes behind Azure's" if offset > 0 else "2.0 hours ahead of Azure's"
    for row in rows:
        assert said in str(row.error), row.error
    assert proxy.expired <= 4  # each object refused on its first request or two, no more
    assert blob_names(blob_service, container) == []
