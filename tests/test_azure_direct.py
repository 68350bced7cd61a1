"""The direct path (Put Blob, Put Block, Get Blob Properties without the SDK's
pipeline) must address blobs exactly as the SDK does; Azurite checks its signatures
in every copy test, this pins the URLs for the names most likely to differ."""

from __future__ import annotations

import pytest
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
