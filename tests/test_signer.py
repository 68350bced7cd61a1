"""blobferry signs each range itself; the URLs must carry botocore's exact signature.

botocore has two signers: its own, and AWS CRT's when awscrt is installed (it is a
dependency here). The test pins ours to both, at the timestamp botocore chose.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import boto3
import botocore.auth
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config

from daemon.addresses import S3Address
from daemon.s3 import S3Reader
from daemon.s3_signing import QuerySigner
from daemon.settings import Settings

KEYS = [
    "plain.bin",
    "dir/sub dir/a b+c=d&e.bin",
    "unicode/žluť ☃.txt",
    "odd/~!*'()$,;:@.x",
    "q?x=1#frag",
]


@pytest.mark.parametrize("reference_signer", ["installed", "botocore"])
@pytest.mark.parametrize(
    ("endpoint", "region", "style", "token"),
    [
        ("http://127.0.0.1:9000", "us-east-1", "path", None),
        (None, "eu-west-1", "virtual", None),
        (None, "us-east-1", "auto", "session-token/with+odd=chars"),
    ],
)
async def test_signatures_match_botocore(
    endpoint: str | None,
    region: str,
    style: str,
    token: str | None,
    reference_signer: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if reference_signer == "botocore":  # the pure-Python signer, not the CRT one
        monkeypatch.setitem(
            botocore.auth.AUTH_TYPE_MAPS, "s3v4-query", botocore.auth.S3SigV4QueryAuth
        )
    creds: dict[str, Any] = {
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "wJalr/XUtnFEMI+K7MDENG",
    }
    if token:
        creds["aws_session_token"] = token
    cfg = {"signature_version": "s3v4", "s3": {"addressing_style": style}}
    reference = boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, config=Config(**cfg), **creds
    )
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=region, config=AioConfig(**cfg), **creds
    ) as client:
        signer = QuerySigner(client, 900)
        for key in KEYS:
            want = urlsplit(
                reference.generate_presigned_url(
                    "get_object", Params={"Bucket": "my-bucket", "Key": key}, ExpiresIn=900
                )
            )
            stamp = dict(parse_qsl(want.query))["X-Amz-Date"]
            now = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            got = urlsplit(await signer.url("my-bucket", key, now=now))
            assert got[:3] == want[:3], key  # scheme, host, path (the key's encoding)
            assert sorted(parse_qsl(got.query)) == sorted(parse_qsl(want.query)), key


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-25T04:02:19.000Z",  # ListObjectsV2
        "2026-11-25T04:02:19Z",
        "2026-11-25T04:02:19.123456+02:00",
        "Wed, 25 Nov 2026 04:02:19 GMT",  # Last-Modified, Expires
        "1700000000",
    ],
)
def test_the_fast_timestamp_parser_agrees_with_botocores(value: str) -> None:
    from botocore.utils import parse_timestamp

    from daemon.s3 import _timestamp

    ours, theirs = _timestamp(value), parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()


async def test_a_bucket_in_another_region_is_signed_for_its_region(
    settings: Settings, moto_endpoint: str, s3_client: Any, bucket: str
) -> None:
    """S3 refuses a presigned URL signed for another region than the bucket's, so a
    bucket outside ``s3.region`` would fail every GET: the region is asked of S3."""
    eu = boto3.client("s3", endpoint_url=moto_endpoint, region_name="eu-west-1")
    away = f"eu-{bucket}"
    eu.create_bucket(Bucket=away, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    eu.put_object(Bucket=away, Key="k.bin", Body=b"far away")
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"at home")
    assert settings.s3.region == "us-east-1"

    def region(url: str) -> str:
        return dict(parse_qsl(urlsplit(url).query))["X-Amz-Credential"].split("/")[2]

    async with S3Reader(settings) as s3:
        urls = await asyncio.gather(*(s3.presign(S3Address(away, "k.bin")) for _ in range(5)))
        assert {region(u) for u in urls} == {"eu-west-1"}
        assert region(await s3.presign(S3Address(bucket, "k.bin"))) == "us-east-1"
        assert region(await s3.presign(S3Address("no-such-bucket-here", "k"))) == "us-east-1"
        async with aiohttp.ClientSession() as http, http.get(urls[0]) as r:
            assert (r.status, await r.read()) == (200, b"far away")
