"""The Azure side: containers, blocks, commits, listings; the sink a copy writes to.

The SDK's own retries are switched off (``retry_total=0``): retries happen in one
place (retry.py), with a policy the settings control. Every SDK error is translated
(azure_errors.py) into a RetryableError or a PermanentError with a message a person
can act on. The requests made once per object or per block go around the SDK's
pipeline (azure_direct.py, which says why), unless ``azure.direct = false``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
import structlog
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import BlobBlock, StandardBlobTier
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from daemon.addresses import AzAddress
from daemon.azure_auth import open_service
from daemon.azure_direct import Direct, DirectPath, put_headers
from daemon.azure_errors import error_code, translate
from daemon.azure_sdk import SdkPath, conditions, refused
from daemon.blockcheck import BlockCheck
from daemon.chunks import Chunks
from daemon.errors import (
    DestinationExistsError,
    PermanentError,
    SourceUnreachableError,
)
from daemon.http1 import Connections
from daemon.latency import RoundTrips
from daemon.properties import BlobHeaders
from daemon.proxies import Proxies
from daemon.seams import BlobId, ExistingBlob, Precondition
from daemon.settings import Settings

log = structlog.get_logger("blobferry")


class AzureWriter:
    """Writes blobs (a BlobSink). Use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._service: BlobServiceClient | None = None
        self._path: DirectPath | None = None  # None: every request through the SDK
        self._sas_expiry: datetime | None = None
        self.round_trips = RoundTrips()  # of HEADs of blobs: how near Azure is
        self.streams = settings.azure.direct  # put_stream needs the direct path
        self._containers: set[str] = set()  # known to exist (azure.create_containers)
        self._creating = asyncio.Lock()
        self._proxies = Proxies()
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.retry.connect_timeout_s,
            sock_read=settings.retry.stall_timeout_s,
        )

    @property
    def sas_expiry(self) -> datetime | None:
        """When the SAS token in use expires; None for other credentials."""
        return self._sas_expiry

    def _error(self, e: AzureError, dst: AzAddress, what: str) -> Exception:
        """The SDK's exception ``e`` as blobferry's, knowing this writer's credential."""
        return translate(e, dst, what, self.sas_expiry)

    async def __aenter__(self) -> AzureWriter:
        try:
            return await self._enter()
        except BaseException:
            await self._stack.aclose()  # the session opened before the failure, too
            raise

    async def _enter(self) -> AzureWriter:
        a = self._settings.azure
        session = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=a.max_connections, limit_per_host=0),
                auto_decompress=False,
            )
        )
        transport = AioHttpTransport(session=session, session_owner=False)
        self._service, policy = await open_service(
            self._settings, transport, self._proxies, self._stack
        )
        direct = Direct(self._service, transport, policy)
        self._sas_expiry = direct.sas_expiry
        if a.direct:
            r = self._settings.retry
            conns = None
            if a.direct_writes:
                conns = Connections(r.connect_timeout_s, r.stall_timeout_s, a.max_connections)
                self._stack.callback(conns.close)
            self._path = DirectPath(
                direct,
                session,
                conns,
                self._proxies,
                r.stall_timeout_s,
                self._timeout,
                self.round_trips,
            )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def identify(self, dst: AzAddress) -> BlobId:
        """The blob ``dst`` names, however it is spelled: ``az://c/b`` and the
        configured account's ``https://`` URL of it are one blob, with one writer."""
        self._check_account(dst)
        assert self._service is not None
        return BlobId(str(self._service.account_name), dst.container, dst.blob)

    def _check_account(self, dst: AzAddress) -> None:
        assert self._service is not None
        if dst.account_url is None:
            return
        # Compared by host and account name: the service's URL carries a SAS query
        # when the credential is one, and a trailing slash or not.
        mine = urlsplit(self._service.url)
        theirs = urlsplit(dst.account_url)
        if (theirs.netloc.lower(), dst.account) != (
            mine.netloc.lower(),
            self._service.account_name,
        ):
            raise PermanentError(
                f"{dst}: the destination account is not the configured one "
                f"({self._service.account_name}); configure its credentials or use az://"
            )

    def _blob(self, dst: AzAddress) -> BlobClient:
        assert self._service is not None
        self._check_account(dst)
        return self._service.get_blob_client(dst.container, dst.blob)

    async def ensure_container(self, dst: AzAddress) -> None:
        """Create ``dst``'s container unless it exists (azure.create_containers): one
        request per container for the run, however many transfers go there at once.
        ``forget`` it when a transfer finds it gone, and the next one creates it again."""
        if dst.container in self._containers:
            return
        async with self._creating:
            if dst.container in self._containers:
                return  # created while this one waited
            assert self._service is not None
            self._check_account(dst)
            try:
                await self._service.get_container_client(dst.container).create_container()
                log.info("container created", container=dst.container)
            except ResourceExistsError as e:
                if error_code(e) != "ContainerAlreadyExists":  # ContainerBeingDeleted
                    raise self._error(e, dst, "create container") from None
            except AzureError as e:
                if error_code(e) == "AuthorizationPermissionMismatch":
                    raise PermanentError(
                        f"{dst}: container {dst.container!r} does not exist and the "
                        "credentials may not create containers; create it, or grant "
                        "that permission"
                    ) from None
                raise self._error(e, dst, "create container") from None
            self._containers.add(dst.container)

    def forget_container(self, dst: AzAddress) -> None:
        self._containers.discard(dst.container)

    def _sdk(self, dst: AzAddress) -> SdkPath:
        """The SDK's path to ``dst`` (azure.direct = false); its account checked."""
        return SdkPath(self._blob(dst), self._error)

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        if self._path is None:
            t0 = asyncio.get_running_loop().time()
            found = await self._sdk(dst).existing(dst)
            self.round_trips.record(asyncio.get_running_loop().time() - t0)
            return found
        self._check_account(dst)
        return await self._path.existing(dst)

    async def put(
        self,
        dst: AzAddress,
        data: Chunks,
        check: BlockCheck,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None = None,
    ) -> None:
        """The whole blob in one Put Blob, checked by Azure against ``check`` (its MD5,
        or S3's CRC64NVME)."""
        if self._path is None:
            await self._sdk(dst).put(dst, data, check, headers, metadata, when, tier)
            return
        self._check_account(dst)
        sent = put_headers(data.size, check, headers, metadata, when, tier)
        await self._path.put(dst, data, sent)

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
    ) -> None:
        """The whole blob in one Put Blob whose body streams from ``body`` as it comes:
        Azure checks all ``size`` bytes against ``check`` (S3's MD5 or CRC64NVME) and
        stores nothing otherwise. The direct path's only (``streams``): the SDK would
        hold the body whole."""
        assert self._path is not None, "a pipe is chosen only where the sink streams"
        self._check_account(dst)
        sent = put_headers(size, check, headers, metadata, when, tier)
        await self._path.put(dst, body, sent)

    async def stage(self, dst: AzAddress, block_id: str, data: Chunks, check: BlockCheck) -> None:
        """One block, which Azure checks against ``check`` (its MD5 or CRC64)."""
        if self._path is None:
            await self._sdk(dst).stage(dst, block_id, data, check)
            return
        self._check_account(dst)
        await self._path.stage(dst, block_id, data, check)

    async def stage_from_url(
        self,
        dst: AzAddress,
        block_id: str,
        url: str,
        offset: int,
        length: int,
        md5: bytes | None = None,
    ) -> None:
        """Azure fetches the range itself: no payload byte passes through this host.
        With ``md5`` (the range's), Azure checks what it fetched against it."""
        try:
            await self._blob(dst).stage_block_from_url(
                block_id, url, source_offset=offset, source_length=length, source_content_md5=md5
            )
        except AzureError as e:
            code = error_code(e)
            if code.startswith("CannotVerifyCopySource"):
                raise SourceUnreachableError(dst, code) from None
            raise self._error(e, dst, f"stage block {block_id} from URL") from None

    async def staged_blocks(self, dst: AzAddress) -> dict[str, int]:
        """Uncommitted blocks already on the destination: {block id: size}."""
        try:
            _, uncommitted = await self._blob(dst).get_block_list("uncommitted")
        except ResourceNotFoundError as e:
            if error_code(e) == "ContainerNotFound":
                raise self._error(e, dst, "list blocks") from None
            return {}
        except AzureError as e:
            raise self._error(e, dst, "list blocks") from None
        return {b.id: b.size for b in uncommitted}

    async def listing(
        self, prefix: AzAddress, per_page: int
    ) -> AsyncIterator[list[tuple[str, ExistingBlob]]]:
        """The committed blobs under ``prefix``, with their sizes and metadata, a page
        (one request) at a time, in name order. Errors pass as the SDK raises them."""
        assert self._service is not None
        self._check_account(prefix)
        container = self._service.get_container_client(prefix.container)
        blobs = container.list_blobs(
            name_starts_with=prefix.blob or None,
            include=["metadata"],
            results_per_page=per_page,
        )
        async for page in blobs.by_page():
            yield [
                (b.name, ExistingBlob(b.size, dict(b.metadata or {}), b.etag or ""))
                async for b in page
            ]

    async def delete(self, dst: AzAddress, when: Precondition) -> None:
        """Delete the blob (and its snapshots) if it is still as ``when`` says; a blob
        gone already is what was asked."""
        try:
            await self._blob(dst).delete_blob(delete_snapshots="include", **conditions(when))
        except ResourceNotFoundError as e:
            if error_code(e) == "ContainerNotFound":
                raise self._error(e, dst, "delete") from None
        except HttpResponseError as e:
            if e.status_code == 412:
                raise refused(when, dst) from None
            raise self._error(e, dst, "delete") from None
        except AzureError as e:
            raise self._error(e, dst, "delete") from None

    async def discard_uncommitted(self, dst: AzAddress) -> None:
        """Delete a blob that has uncommitted blocks and nothing committed: the one way
        to be rid of blocks another writer left. Only for a blob a HEAD found absent."""
        try:
            await self._blob(dst).delete_blob()
        except ResourceNotFoundError:
            return  # gone already: what was asked
        except AzureError as e:
            raise self._error(e, dst, "delete uncommitted blocks") from None

    async def commit(
        self,
        dst: AzAddress,
        block_ids: list[str],
        md5: bytes | None,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None = None,
    ) -> None:
        try:
            await self._blob(dst).commit_block_list(
                [BlobBlock(block_id=i) for i in block_ids],
                content_settings=headers.settings(md5),
                metadata=metadata,
                standard_blob_tier=StandardBlobTier(tier) if tier else None,
                **conditions(when),
            )
        except ResourceExistsError:
            raise DestinationExistsError(dst) from None
        except HttpResponseError as e:
            if e.status_code == 412:
                raise refused(when, dst) from None
            raise self._error(e, dst, "commit block list") from None
        except AzureError as e:
            raise self._error(e, dst, "commit block list") from None
