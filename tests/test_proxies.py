"""An egress proxy between blobferry and both clouds: HTTP(S)_PROXY and NO_PROXY."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from tests.conftest import make_settings
from tests.helpers import MiB, blob_bytes, copy, payload
from tests.httpproxy import HttpProxy


@pytest.mark.parametrize("no_proxy", ["", "localhost"])
async def test_every_request_takes_the_proxy_the_environment_names(
    no_proxy: str,
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance in a private subnet reaches S3 and Azure through a proxy that wants a
    login. botocore (HEAD, LIST) read HTTP_PROXY, but the presigned GETs and the direct
    Azure requests went straight out and never arrived. Every kind of request goes
    through it here: the LIST and HEADs, the presigned GETs, a Put Blob, Put Blocks and
    the SDK's Put Block List. With NO_PROXY naming Azure's host, Azure's go direct."""
    azure_host = azurite_endpoint.replace("127.0.0.1", "localhost")  # NO_PROXY can name it
    settings = make_settings(tmp_path, moto_endpoint, azure_host)
    bodies = {"small.bin": payload(1000), "blocks.bin": payload(9 * MiB, seed=1)}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=f"p/{key}", Body=body)
    async with HttpProxy(login=("egress", "pa55word")) as proxy:
        with monkeypatch.context() as env:  # the test's own clients go straight
            env.setenv("HTTP_PROXY", proxy.endpoint.replace("//", "//egress:pa55word@"))
            env.setenv("NO_PROXY", no_proxy)
            status, rows = await copy(settings, f"s3://{bucket}/p/", f"az://{container}/")
    assert status == "done", [r.error for r in rows]
    for key, body in bodies.items():
        assert blob_bytes(blob_service, container, key) == body
    assert proxy.refused == 0
    s3_port, az_port = moto_endpoint.rsplit(":", 1)[1], azurite_endpoint.rsplit(":", 1)[1]
    to_s3 = [r for r in proxy.seen if f":{s3_port}/" in r]
    to_azure = [r for r in proxy.seen if f":{az_port}/" in r]
    assert any("list-type=2" in r for r in to_s3)  # botocore
    assert any("X-Amz-Signature=" in r for r in to_s3)  # the presigned GETs
    if no_proxy:
        assert to_azure == []
    else:
        assert any("comp=block&" in r for r in to_azure)  # direct: Put Block
        assert any("comp=blocklist" in r for r in to_azure)  # the SDK: Put Block List
        assert any(r.startswith("PUT") and r.endswith("/small.bin") for r in to_azure)


async def test_a_plain_http_proxy_refusing_its_login_is_named(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over plain http the proxy's 407 is the answer to the request itself (botocore's
    LIST here): it was "S3 answered 407". Its password reaches no report."""
    settings = make_settings(tmp_path, moto_endpoint, azurite_endpoint)
    s3_client.put_object(Bucket=bucket, Key="p/a.bin", Body=b"a")
    async with HttpProxy(login=("egress", "pa55word")) as proxy:
        with monkeypatch.context() as env:
            env.setenv("HTTP_PROXY", proxy.endpoint.replace("//", "//egress:n0tThat@"))
            status, [row] = await copy(settings, f"s3://{bucket}/p/", f"az://{container}/")
    assert status == "failed" and row.error is not None
    assert "the egress proxy refused its login (407" in row.error
    assert "n0tThat" not in row.error and proxy.refused >= 1
