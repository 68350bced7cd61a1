"""Two writers of one blob, as two daemons on one queue are: a commit lands only on the
blob as the transfer looked at it, and a blob never goes back to an older version.

The other writer is real (a Put Blob through Azurite, an object rewritten in moto),
made to land at the worst moment: between the copy's look and its commit. Azurite
honours If-Match and If-None-Match on Put Blob and Put Block List as Azure documents
them ("Specifying conditional headers for Blob service operations").
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError
from azure.storage.blob import BlobServiceClient

from daemon.addresses import parse_azure
from daemon.azure import AzureWriter
from daemon.blockcheck import BlockCheck, Kind
from daemon.budget import Budget
from daemon.chunks import Chunks
from daemon.errors import BlobChangedError, DestinationExistsError
from daemon.jobs import parse_job
from daemon.outcome import Status
from daemon.properties import BlobHeaders
from daemon.s3 import S3Reader
from daemon.seams import Precondition
from daemon.settings import Settings
from daemon.transfer import Copier
from tests.helpers import MiB, blob_bytes, payload


class _Racing:
    """The real AzureWriter, with another writer's work done just before this one's
    first commit (Put Blob or Put Block List)."""

    def __init__(self, inner: AzureWriter, before: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._before: Callable[[], Awaitable[None]] | None = before
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _race(self) -> None:
        self.commits += 1
        if self._before is not None:
            before, self._before = self._before, None
            await before()

    async def put(self, *args: Any, **kw: Any) -> None:
        await self._race()
        await self._inner.put(*args, **kw)

    async def put_stream(self, *args: Any, **kw: Any) -> None:
        await self._race()
        await self._inner.put_stream(*args, **kw)

    async def commit(self, *args: Any, **kw: Any) -> None:
        await self._race()
        await self._inner.commit(*args, **kw)


async def _copy(settings: Settings, source: str, destination: str, race: Any) -> Any:
    [spec] = parse_job(f'{{"source": "{source}", "destination": "{destination}"}}')
    async with S3Reader(settings) as s3, AzureWriter(settings) as az:
        sink = _Racing(az, lambda: race(s3, az))
        copier = Copier(settings, s3, sink, Budget(settings.memory_bytes))  # type: ignore[arg-type]
        return await copier.copy(spec), sink.commits


@pytest.mark.parametrize("size", [64 * 1024, 9 * MiB], ids=["whole", "blocks"])
async def test_a_newer_version_committed_meanwhile_is_never_overwritten(
    size: int,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """This copy looked (no blob), read v1; another daemon then wrote v2 to S3 and
    committed it. This copy's commit is refused, it looks again, finds the blob holding
    S3's current version, and skips: the blob stays on v2."""
    v1, v2 = payload(size, seed=1), payload(size, seed=2)
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=v1)
    dst = f"az://{container}/k.bin"

    async def other_daemon(s3: S3Reader, az: AzureWriter) -> None:
        s3_client.put_object(Bucket=bucket, Key="k.bin", Body=v2)
        [spec] = parse_job(f'{{"source": "s3://{bucket}/k.bin", "destination": "{dst}"}}')
        outcome = await Copier(settings, s3, az, Budget(settings.memory_bytes)).copy(spec)
        assert outcome.status is Status.COPIED

    outcome, commits = await _copy(settings, f"s3://{bucket}/k.bin", dst, other_daemon)
    assert outcome.status is Status.SKIPPED, outcome
    assert "unchanged" in (outcome.note or "")
    assert commits == 1  # the refused one; the look after it skipped
    assert blob_bytes(blob_service, container, "k.bin") == v2


async def test_a_blob_written_meanwhile_is_looked_at_again(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Something else wrote the blob after this copy saw it absent: If-None-Match
    refuses the commit, the copy looks again and lands on what is there now (If-Match
    on its ETag), so the blob ends equal to S3's object."""
    body = payload(100_000, seed=3)
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=body)

    async def someone_else(s3: S3Reader, az: AzureWriter) -> None:
        blob_service.get_blob_client(container, "k.bin").upload_blob(b"not this")

    outcome, commits = await _copy(
        settings, f"s3://{bucket}/k.bin", f"az://{container}/k.bin", someone_else
    )
    assert outcome.status is Status.COPIED
    assert commits == 2
    assert blob_bytes(blob_service, container, "k.bin") == body


async def test_the_sink_sends_the_precondition(
    settings: Settings, blob_service: BlobServiceClient, container: str
) -> None:
    """At the seam: If-Match on a stale ETag and If-None-Match on a present blob are
    refused, on the direct path and the SDK's, and nothing is written."""
    client = blob_service.get_blob_client(container, "b.bin")
    first = client.upload_blob(b"first")["etag"]
    client.upload_blob(b"second", overwrite=True)
    dst = parse_azure(f"az://{container}/b.bin")
    data = Chunks()
    data.append(b"third")
    data.size = 5
    md5 = BlockCheck(Kind.MD5, hashlib.md5(b"third").digest())
    for direct in (True, False):
        tuned = settings.model_copy(
            update={"azure": settings.azure.model_copy(update={"direct": direct})}
        )
        async with AzureWriter(tuned) as az:
            with pytest.raises(BlobChangedError):
                await az.put(dst, data, md5, BlobHeaders(), {}, Precondition(etag=first))
            with pytest.raises(DestinationExistsError):
                await az.put(dst, data, md5, BlobHeaders(), {}, Precondition(absent=True))
            with pytest.raises(BlobChangedError):
                await az.commit(dst, [], None, BlobHeaders(), {}, Precondition(etag=first))
            now = await az.existing(dst)
            assert now is not None and now.etag
    assert client.download_blob().readall() == b"second"
    # Azurite itself refuses a stale If-Match: the premise of the tests above.
    with pytest.raises(ResourceModifiedError):
        client.upload_blob(
            b"x", overwrite=True, etag=first, match_condition=MatchConditions.IfNotModified
        )
