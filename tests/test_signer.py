"""blobferry signs each range itself; the URLs must be exactly botocore's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.auth
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config

from daemon.s3 import QuerySigner

NOW = datetime(2026, 11, 25, 1, 2, 3, tzinfo=UTC)
KEYS = [
    "plain.bin",
    "dir/sub dir/a b+c=d&e.bin",
    "unicode/žluť ☃.txt",
    "odd/~!*'()$,;:@.x",
    "q?x=1#frag",
]


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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    creds: dict[str, Any] = {
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "wJalr/XUtnFEMI+K7MDENG",
    }
    if token:
        creds["aws_session_token"] = token
    cfg = {"signature_version": "s3v4", "s3": {"addressing_style": style}}
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda *a, **k: NOW.replace(tzinfo=None)
    )
    reference = boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, config=Config(**cfg), **creds
    )
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=region, config=AioConfig(**cfg), **creds
    ) as client:
        signer = QuerySigner(client, 900)
        for key in KEYS:
            want = reference.generate_presigned_url(
                "get_object", Params={"Bucket": "my-bucket", "Key": key}, ExpiresIn=900
            )
            assert await signer.url("my-bucket", key, now=NOW) == want, key
