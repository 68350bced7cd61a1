"""Properties carried, overrides and tiers applied, nothing copied twice, archived objects skipped."""

from __future__ import annotations

from typing import Any

from azure.storage.blob import BlobServiceClient

from daemon.properties import ascii_disposition
from daemon.settings import Settings
from tests.helpers import MiB, blob_bytes, blob_names, copy, payload
from tests.proxy import FaultProxy
from tests.test_faults import through


def object_gets(proxy: FaultProxy, bucket: str) -> list[str]:
    """GETs of object bytes (a listing is a GET of the bucket with a query)."""
    return [r for r in proxy.requests if r.startswith(f"GET /{bucket}/")]


async def test_second_run_skips_everything_without_reading_a_byte(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    for i in range(12):
        s3_client.put_object(Bucket=bucket, Key=f"d/{i}.bin", Body=payload(5000 + i, seed=i))
    s3_client.put_object(Bucket=bucket, Key="d/big.bin", Body=payload(20 * MiB, seed=99))
    async with FaultProxy(moto_endpoint) as proxy:
        tuned = through(settings, proxy)
        status, rows = await copy(tuned, f"s3://{bucket}/d/", f"az://{container}/d/")
        assert status == "done" and {r.status for r in rows} == {"copied"}
        assert object_gets(proxy, bucket)  # the proxy does see object reads
        proxy.requests.clear()
        down = proxy.bytes_down
        status, rows = await copy(tuned, f"s3://{bucket}/d/", f"az://{container}/d/")
        assert status == "done" and {r.status for r in rows} == {"skipped"}
        assert all("unchanged" in (r.detail.get("note") or "") for r in rows)
        # The listing alone decides: not one request names an object.
        assert proxy.requests and all("list-type=2" in r for r in proxy.requests)
        assert proxy.bytes_down - down < 64 * 1024
        # A changed object is copied again; the others are still skipped.
        s3_client.put_object(Bucket=bucket, Key="d/3.bin", Body=b"new version")
        status, rows = await copy(tuned, f"s3://{bucket}/d/", f"az://{container}/d/")
    by_key = {r.source.rsplit("/", 1)[1]: r.status for r in rows}
    assert by_key.pop("3.bin") == "copied" and set(by_key.values()) == {"skipped"}
    assert blob_bytes(blob_service, container, "d/3.bin") == b"new version"
    meta = blob_service.get_blob_client(container, "d/big.bin").get_blob_properties().metadata
    assert len(meta["blobferry_fingerprint"]) == 32 and meta["blobferry_source_etag"]


async def test_single_object_if_changed_reads_only_the_head(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="one.bin", Body=payload(12 * MiB))
    async with FaultProxy(moto_endpoint) as proxy:
        tuned = through(settings, proxy)
        assert (await copy(tuned, f"s3://{bucket}/one.bin", f"az://{container}/one.bin"))[
            0
        ] == "done"
        proxy.requests.clear()
        status, [row] = await copy(tuned, f"s3://{bucket}/one.bin", f"az://{container}/one.bin")
    assert (status, row.status) == ("done", "skipped")
    assert proxy.requests == [f"HEAD /{bucket}/one.bin"]


async def test_overrides_tiers_and_the_storage_class_map(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(
        Bucket=bucket,
        Key="a.csv",
        Body=b"a,b\n",
        ContentType="text/plain",
        Metadata={"source-system": "erp"},
    )
    s3_client.put_object(
        Bucket=bucket, Key="ia.bin", Body=payload(9 * MiB), StorageClass="STANDARD_IA"
    )
    tuned = settings.model_copy(
        update={"azure": settings.azure.model_copy(update={"tiers": {"STANDARD_IA": "Cool"}})}
    )
    status, _ = await copy(
        tuned,
        f"s3://{bucket}/a.csv",
        f"az://{container}/a.csv",
        content_type="text/csv",
        metadata={"team": "ops"},
        tier="Archive",
    )
    assert status == "done"
    p = blob_service.get_blob_client(container, "a.csv").get_blob_properties()
    assert p.content_settings.content_type == "text/csv"
    assert p.metadata["team"] == "ops" and p.metadata["source_system"] == "erp"
    assert p.blob_tier == "Archive"
    status, _ = await copy(tuned, f"s3://{bucket}/ia.bin", f"az://{container}/ia.bin")
    assert status == "done"
    assert (
        blob_service.get_blob_client(container, "ia.bin").get_blob_properties().blob_tier == "Cool"
    )


async def test_archived_objects_are_skipped_with_a_reason_and_the_prefix_goes_on(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="p/cold.bin", Body=b"frozen", StorageClass="GLACIER")
    s3_client.put_object(
        Bucket=bucket, Key="p/deep.bin", Body=payload(9 * MiB), StorageClass="DEEP_ARCHIVE"
    )
    s3_client.put_object(Bucket=bucket, Key="p/warm.bin", Body=b"ok")
    status, rows = await copy(settings, f"s3://{bucket}/p/", f"az://{container}/p/")
    by_key = {r.source.rsplit("/", 1)[1]: r for r in rows}
    assert status == "done"
    assert by_key["warm.bin"].status == "copied"
    for key in ("cold.bin", "deep.bin"):
        assert by_key[key].status == "skipped"
        assert (
            "archived" in by_key[key].detail["note"] and "restore it" in by_key[key].detail["note"]
        )
    assert blob_names(blob_service, container) == ["p/warm.bin"]
    strict = settings.model_copy(update={"archived": "fail"})
    status, rows = await copy(strict, f"s3://{bucket}/p/", f"az://{container}/q/")
    assert status == "failed"
    assert {r.status for r in rows if "warm" not in r.source} == {"failed"}


async def test_verification_can_be_switched_off(
    settings: Settings,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="x.bin", Body=payload(20 * MiB))
    off = settings.model_copy(update={"verify": False})
    status, [row] = await copy(off, f"s3://{bucket}/x.bin", f"az://{container}/x.bin")
    assert (
        status == "done" and row.detail["verified"] == "size: verification is off (verify = false)"
    )


def test_a_non_ascii_content_disposition_as_rfc_6266_writes_it() -> None:
    """UTF-8 read as Latin-1 (as HTTP reads header bytes: what a real uploader's name
    looks like on arrival), Latin-1 itself, an RFC 2231 name beside a plain one, an
    unquoted name with a space, other parameters, and a value with no type to keep."""
    utf8_as_latin1 = "caf\u00e9.pdf".encode().decode("latin-1")
    cases = {
        f'attachment; filename="{utf8_as_latin1}"': (
            "attachment; filename=\"cafe.pdf\"; filename*=UTF-8''caf%C3%A9.pdf"
        ),
        'Attachment; filename="caf\u00e9.pdf"': (
            "attachment; filename=\"cafe.pdf\"; filename*=UTF-8''caf%C3%A9.pdf"
        ),
        "attachment; filename=\"\u00e9.pdf\"; filename*=UTF-8''%C3%A9.pdf": (
            "attachment; filename=\"e.pdf\"; filename*=UTF-8''%C3%A9.pdf"
        ),
        "inline; filename=r\u00e9sum\u00e9 final.pdf; size=10": (
            'inline; filename="resume final.pdf"; '
            "filename*=UTF-8''r%C3%A9sum%C3%A9%20final.pdf; size=\"10\""
        ),
        'attachment; filename="a\\"b \u00e9.txt"': (
            'attachment; filename="a\\"b e.txt"; filename*=UTF-8\'\'a%22b%20%C3%A9.txt'
        ),
        "f\u00e9; x=1": None,
    }
    for value, expected in cases.items():
        assert ascii_disposition(value) == expected, value
