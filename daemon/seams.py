"""The two sides a copy is made between, as the Copier sees them.

A copy reads objects from an ObjectSource (S3Reader, in s3.py) and writes blobs to a
BlobSink (AzureWriter, in azure.py). Nothing above these seams imports either side's
SDK, so a test can put a real emulator, a fault proxy or a stricter double behind them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from daemon.addresses import AzAddress, S3Address
from daemon.blockcheck import BlockCheck
from daemon.chunks import Chunks
from daemon.latency import RoundTrips
from daemon.objects import Listed, ObjectInfo
from daemon.properties import BlobHeaders


class BlobId(NamedTuple):
    """One blob, whichever address spelled it."""

    account: str
    container: str
    blob: str


@dataclass(frozen=True, slots=True)
class ExistingBlob:
    size: int
    metadata: dict[str, str]
    etag: str = ""  # as Azure gave it, quotes and all: what If-Match sends back


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a write requires of the blob it replaces: nothing, that there is none
    (``absent``), or that it is still the one the transfer looked at (``etag``). Several
    daemons on one queue may copy one object at once; with this, a commit never lands
    over a blob that changed after the transfer looked at it."""

    absent: bool = False
    etag: str | None = None

    def headers(self) -> dict[str, str]:
        if self.absent:
            return {"If-None-Match": "*"}
        if self.etag:
            return {"If-Match": self.etag}
        return {}

    @classmethod
    def of(cls, blob: ExistingBlob | None) -> Precondition:
        """The blob as looked at: absent, or this very ETag."""
        return cls(absent=True) if blob is None else cls(etag=blob.etag or None)


ANYTHING = Precondition()  # overwrite 'always': last writer wins


class ObjectSource(Protocol):
    """Where objects are read from: S3."""

    round_trips: RoundTrips  # of HEADs: how near the source is

    async def head(self, address: S3Address, checksums: bool = False) -> ObjectInfo: ...
    async def part_sizes(self, info: ObjectInfo) -> list[int]: ...
    async def read_range(
        self, info: ObjectInfo, start: int, length: int, into: bytearray | None = None
    ) -> Chunks: ...
    async def read_object(
        self, listed: Listed, address: S3Address
    ) -> tuple[ObjectInfo, Chunks]: ...
    def open_object(
        self, info: ObjectInfo
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...
    async def presign(self, info: ObjectInfo | S3Address) -> str: ...


class BlobSink(Protocol):
    """Where blobs are written: Azure Blob Storage. Every write that carries bytes
    carries their MD5 or CRC64, which Azure checks before it keeps anything. A write whose
    Precondition fails raises DestinationExistsError (it asked for absence) or
    BlobChangedError (it named an ETag)."""

    round_trips: RoundTrips  # of HEADs: how near the sink is
    streams: bool  # whether put_stream can send a body as it arrives

    def identify(self, dst: AzAddress) -> BlobId: ...
    async def ensure_container(self, dst: AzAddress) -> None: ...
    def forget_container(self, dst: AzAddress) -> None: ...
    async def existing(self, dst: AzAddress) -> ExistingBlob | None: ...
    def listing(
        self, prefix: AzAddress, per_page: int
    ) -> AsyncIterator[list[tuple[str, ExistingBlob]]]: ...
    async def put(
        self,
        dst: AzAddress,
        data: Chunks,
        check: BlockCheck,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None = None,
    ) -> None: ...
    async def put_stream(
        self,
        dst: AzAddress,
        body: AsyncIterable[bytes],
        size: int,
        check: BlockCheck,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None = None,
    ) -> None: ...
    async def stage(
        self, dst: AzAddress, block_id: str, data: Chunks, check: BlockCheck
    ) -> None: ...
    async def stage_from_url(
        self,
        dst: AzAddress,
        block_id: str,
        url: str,
        offset: int,
        length: int,
        md5: bytes | None = None,
    ) -> None: ...
    async def staged_blocks(self, dst: AzAddress) -> dict[str, int]: ...
    async def delete(self, dst: AzAddress, when: Precondition) -> None: ...
    async def discard_uncommitted(self, dst: AzAddress) -> None: ...
    async def commit(
        self,
        dst: AzAddress,
        block_ids: list[str],
        md5: bytes | None,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None = None,
    ) -> None: ...
