"""The direct path (Put Blob, Put Block, Get Blob Properties without the SDK's
pipeline) must address blobs exactly as the SDK does; Azurite checks its signatures
in every copy test, this pins the URLs for the names most likely to differ, and the
shared-key signatures signed here to the SDK's policy."""

from __future__ import annotations

import pytest
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from azure.storage.blob.aio import BlobServiceClient

from daemon.addresses import AzAddress
from daemon.azure_direct import Direct
from tests.emulators import connection_string

NAMES = [
    "plain.bin",
    "dir/sub dir/a b+c=d&e.bin",
    "unicode/žluť ☃.txt",
    "odd/~!*'()$,;:@.x",
    "q?x=1#frag",
    "trailing.",
    "%41 percent",
]


@pytest.mark.parametrize("credential", ["key", "sas"])
async def test_direct_urls_are_the_sdks(credential: str) -> None:
    if credential == "key":
        service = BlobServiceClient.from_connection_string(connection_string("http://127.0.0.1:1"))
    else:
        service = BlobServiceClient(
            "https://acct.blob.core.windows.net", credential="sv=2024-11-04&sig=a%2Bb%3D"
        )
    async with service:
        direct = Direct(service, None, None)
        for name in NAMES:
            sdk = service.get_blob_client("my-container", name).url
            assert direct.url(AzAddress("my-container", name), {}) == sdk
        with_query = direct.url(AzAddress("c", "b"), {"comp": "block", "blockid": "YQ=="})
        assert "comp=block&blockid=YQ%3D%3D" in with_query
        assert with_query.endswith("sv=2024-11-04&sig=a%2Bb%3D") == (credential == "sas")


async def test_the_shared_key_signatures_are_the_sdks() -> None:
    """Signed here (shared_key) and by SharedKeyCredentialPolicy, the same Authorization
    for every name, query and header set the direct path sends, metadata keys among
    them whose order the service's collation decides ('-' and '_' sort unlike ASCII)."""
    service = BlobServiceClient.from_connection_string(connection_string("http://127.0.0.1:1"))
    async with service:
        policy = service._credential_policy
        assert isinstance(policy, SharedKeyCredentialPolicy)
        direct = Direct(service, AioHttpTransport(), policy)
        sdk = Direct(service, AioHttpTransport(), policy)
        sdk._key = None  # through the SDK's policy, as before this module signed
        header_sets = [
            {"Content-Length": "0"},
            {
                "Content-Length": "48000",
                "Content-MD5": "q83vEjRWeJA=",
                "x-ms-blob-type": "BlockBlob",
            },
            {
                "Content-Length": "5",
                "x-ms-blob-type": "BlockBlob",
                "x-ms-blob-content-type": "text/plain",
                "x-ms-meta-run-id": "1",
                "x-ms-meta-run_id": "2",
                "x-ms-meta-runid": "3",
                "x-ms-meta-Run-ID2": "4",
                "x-ms-meta-a": "",
                "If-Match": '"0x8D"',
                "x-ms-access-tier": "Cool",
            },
            {"Content-Length": "7", "x-ms-content-crc64": "AAECAwQFBgc="},
        ]
        queries = [{}, {"comp": "block", "blockid": "YWJj+/=="}, {"comp": "properties"}]
        for name in [*NAMES, "semi;colon=1", "dash-_.x"]:
            for headers in header_sets:
                for query in queries:
                    dst = AzAddress("my-container", name)
                    ours = await direct.prepare("PUT", dst, query, dict(headers))
                    theirs = await sdk.prepare("PUT", dst, query, dict(headers))
                    assert ours[0] == theirs[0]
                    assert ours[1]["Authorization"] == theirs[1]["Authorization"], (name, headers)
