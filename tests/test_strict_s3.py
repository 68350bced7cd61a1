"""Keys real buckets hold, copied through an S3 that checks signatures as Amazon S3 does.

Every S3 request of the suite passes tests/strict_s3.py (the ``moto_endpoint`` fixture);
here the keys that a client re-encoding its path after signing gets wrong are copied on
every route, and the front itself is shown to refuse what S3 refuses.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from azure.storage.blob._blob_client_helpers import _encode_source_url
from yarl import URL

from daemon.addresses import S3Address
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.sigv4 import UrlShape, presign_get, signing_key
from tests.conftest import make_settings
from tests.helpers import MiB, blob_bytes, copy, payload
from tests.strict_s3 import Request, StrictS3, check

# Hive partitions, ISO timestamps, Spark part names, and every printable ASCII
# punctuation character, a space, a plus and non-ASCII letters.
HOSTILE = [
    "dt=2024-01-01/hour=03/part-00000-1a2b(1).snappy.parquet",
    "ts/2024-05-06T07:08:09.123+00:00.json",
    "sp ace and+plus.txt",
    "ünï/cödé/日本.bin",
    "x//double-slash",
    *(f"p/{i:02d}{c}k{c}" for i, c in enumerate(string.punctuation)),
]
DOT_SEGMENTS = ["d/./dot.bin", "d/../dotdot.bin"]


def _secrets() -> dict[str, str]:
    return {"testing-key-id": "testing-secret"}


def test_the_front_refuses_a_path_sent_other_than_signed() -> None:
    """Signed over ``year%3D2024``, sent as ``year=2024``: S3 refuses, and so does this."""
    shape = UrlShape("http", "127.0.0.1:9", "/bkt/", "", "us-east-1", "s3")
    now = datetime.now(UTC)
    url = presign_get(
        shape,
        "year=2024/x.bin",
        "testing-key-id",
        None,
        60,
        now,
        lambda day: signing_key("testing-secret", day, "us-east-1", "s3"),
    )
    target = url.split("127.0.0.1:9", 1)[1]
    headers = [("Host", "127.0.0.1:9")]
    assert check(Request("GET", target, headers), _secrets(), now) is None
    resent = check(Request("GET", target.replace("%3D", "="), headers), _secrets(), now)
    assert resent is not None and not isinstance(resent, str)
    assert resent.code == "SignatureDoesNotMatch"
    port_added = check(Request("GET", target, [("Host", "127.0.0.1:9:9")]), _secrets(), now)
    assert port_added is not None and not isinstance(port_added, str)
    assert port_added.code == "SignatureDoesNotMatch"


def test_boto3_passes_the_front_with_every_hostile_key(
    moto_endpoint: str, bucket: str, strict_s3: StrictS3
) -> None:
    """The front agrees with botocore's signer: its own check, before it judges ours."""
    s3_client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    before = strict_s3.tally.checked
    refused = len(strict_s3.tally.refused)
    for key in [*HOSTILE, *DOT_SEGMENTS]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()
    assert strict_s3.tally.checked >= before + 2 * (len(HOSTILE) + len(DOT_SEGMENTS))
    assert len(strict_s3.tally.refused) == refused


@pytest.mark.parametrize(
    ("size", "pipe"),
    [(3000, 0), (3 * MiB + 7, 0), (3 * MiB + 7, 64)],
    ids=["whole", "blocks", "pipe"],
)
async def test_hostile_keys_copy_on_every_route(
    size: int,
    pipe: int,
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
        tmp_path, moto_endpoint, azurite_endpoint, block_size_mb=1, pipe_max_mb=pipe
    )
    bodies = {key: payload(size, seed=n) for n, key in enumerate(HOSTILE)}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    refused = len(strict_s3.tally.refused)
    status, rows = await copy(settings, f"s3://{bucket}/in/", f"az://{container}/out/")
    assert len(strict_s3.tally.refused) == refused, strict_s3.tally.refused[refused:]
    assert status == "done", [r.error for r in rows if r.error]
    assert len(rows) == len(HOSTILE)
    for key, body in bodies.items():
        assert blob_bytes(blob_service, container, f"out/{key}") == body, key


@pytest.mark.parametrize("key", DOT_SEGMENTS)
async def test_dot_segments_are_read_as_named(
    key: str,
    settings: Settings,
    strict_s3: StrictS3,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """``d/./dot.bin`` is its own object: a client that resolves the dot reads another
    key (or none), and S3 refuses the signature besides."""
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"the dotted one")
    s3_client.put_object(
        Bucket=bucket, Key=key.replace("/./", "/").replace("d/../", ""), Body=b"not this"
    )
    refused = len(strict_s3.tally.refused)
    status, [row] = await copy(settings, f"s3://{bucket}/{key}", f"az://{container}/dot.bin")
    assert status == "done", row.error
    assert len(strict_s3.tally.refused) == refused
    assert blob_bytes(blob_service, container, "dot.bin") == b"the dotted one"


async def test_server_side_urls_are_accepted_as_they_stand(
    settings: Settings, strict_s3: StrictS3, s3_client: Any, bucket: str
) -> None:
    """What Azure is handed in server-side mode is fetched by it as it stands: each URL,
    sent without a byte changed, passes the front and reads the object."""
    for key in [*HOSTILE, *DOT_SEGMENTS]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    refused = len(strict_s3.tally.refused)
    async with S3Reader(settings) as s3, aiohttp.ClientSession() as http:
        for key in [*HOSTILE, *DOT_SEGMENTS]:
            url = await s3.presign(S3Address(bucket, key))
            # The SDK re-encodes a source URL (unquote, then quote): it must come out
            # as signed, or Azure's GET is refused by S3.
            assert _encode_source_url(url) == url
            async with http.get(URL(url, encoded=True)) as resp:
                assert resp.status == 200, (key, await resp.text())
                assert await resp.read() == key.encode()
    assert len(strict_s3.tally.refused) == refused


async def test_an_endpoint_with_its_default_port_spelled_out_is_signed_as_sent(
    tmp_path: Path,
    moto_server: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """``http://host:80``: the Host header sent has no port, so none may be signed."""
    host = f"127.{datetime.now(UTC).microsecond % 200 + 20}.0.1"
    try:
        front = await StrictS3(moto_server, _secrets(), host=host, port=80).__aenter__()
    except OSError as e:
        pytest.skip(f"cannot listen on {host}:80 here: {e}")
    try:
        s3_client.put_object(Bucket=bucket, Key="k=v/obj.bin", Body=payload(3 * MiB))
        settings = make_settings(tmp_path, f"http://{host}:80", azurite_endpoint, block_size_mb=1)
        status, [row] = await copy(
            settings, f"s3://{bucket}/k=v/obj.bin", f"az://{container}/obj.bin"
        )
        assert status == "done", row.error
        assert front.tally.refused == []
        assert front.tally.checked > 0
    finally:
        await front.__aexit__(None, None, None)
    assert blob_bytes(blob_service, container, "obj.bin") == payload(3 * MiB)


async def test_a_refused_signature_is_not_blamed_on_the_credentials(
    settings: Settings, s3_client: Any, bucket: str, container: str, strict_s3: StrictS3
) -> None:
    """A secret that is not the access key's: S3 names the signature, so must we (a
    LIST's answer has a body; a HEAD's has none, and its message says so)."""
    s3_client.put_object(Bucket=bucket, Key="d/obj.bin", Body=b"x" * 100)
    strict_s3.secrets["testing-key-id"] = "another-secret"
    try:
        listed, rows = await copy(settings, f"s3://{bucket}/d/", f"az://{container}/d/")
        headed, [row] = await copy(settings, f"s3://{bucket}/d/obj.bin", f"az://{container}/o")
    finally:
        strict_s3.secrets["testing-key-id"] = "testing-secret"
    assert (listed, headed) == ("failed", "failed")
    assert rows == [] or all(r.error for r in rows)
    assert row.error is not None and "secret key is wrong" in row.error
