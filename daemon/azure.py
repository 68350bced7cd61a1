"""The Azure side: stage, commit, block lists, properties.

The SDK's own retries are switched off (``retry_total=0``): retries happen in one
place, per block, in transfer.py, with a policy the settings control. Every SDK error
is translated here into a RetryableError or a PermanentError with a message a person
can act on; SDK messages are not passed through, so no URL or token can leak.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import BlobBlock, ContentSettings, StandardBlobTier
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from daemon.errors import CorruptBlockError, PermanentError, RetryableError
from daemon.jobs import AzAddress
from daemon.s3 import Chunks
from daemon.settings import Settings

_RETRYABLE_CODES = {"ServerBusy", "InternalError", "OperationTimedOut", "ServiceUnavailable"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class BlobHeaders:
    """The HTTP properties a blob carries, taken from the source object."""

    content_type: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_disposition: str | None = None
    cache_control: str | None = None

    def settings(self, md5: bytes | None) -> ContentSettings:
        return ContentSettings(
            content_type=self.content_type or "application/octet-stream",
            content_encoding=self.content_encoding,
            content_language=self.content_language,
            content_disposition=self.content_disposition,
            cache_control=self.cache_control,
            content_md5=bytearray(md5) if md5 is not None else None,
        )


@dataclass(frozen=True, slots=True)
class ExistingBlob:
    size: int
    metadata: dict[str, str]


class SourceUnreachableError(PermanentError):
    """Azure could not fetch the source URL itself (Put Block From URL)."""

    def __init__(self, dst: AzAddress, code: str) -> None:
        super().__init__(f"{dst}: Azure could not read the source URL ({code})")
        self.code = code


class DestinationExistsError(PermanentError):
    def __init__(self, destination: AzAddress) -> None:
        super().__init__(f"{destination} already exists and overwrite is 'never'")


def azure_metadata(metadata: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """S3 metadata keys as valid Azure names (C# identifiers).

    The rule: every character that is not a letter, digit or underscore becomes ``_``;
    a key that starts with a digit gets a leading ``_``; a key that then collides with
    another gets ``_2``, ``_3`` ... Returns the metadata and {original: renamed}.
    """
    out: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for key in sorted(metadata):
        name = key if _IDENTIFIER.match(key) else re.sub(r"[^A-Za-z0-9_]", "_", key)
        if name[:1].isdigit() or not name:
            name = "_" + name
        base, n = name, 1
        while name.lower() in (k.lower() for k in out):
            n += 1
            name = f"{base}_{n}"
        if name != key:
            renamed[key] = name
        out[name] = metadata[key]
    return out, renamed


# aiohttp warns about any raw-bytes body over 1 MiB; a Put Blob body is bounded by
# block_size_mb and the SDK accepts nothing else there. Blocks go as slices instead.
warnings.filterwarnings("ignore", "Sending a large body directly", ResourceWarning)


async def _stream(chunks: Chunks) -> AsyncIterator[bytes]:
    """The block's chunks as received: sent without a copy, and aiohttp drains the
    socket between them instead of queueing megabytes in the transport at once."""
    for chunk in chunks:
        yield chunk


class AzureWriter:
    """Writes blobs. Use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._service: BlobServiceClient | None = None
        self._token_credential = False
        self._transport: AioHttpTransport | None = None

    async def __aenter__(self) -> AzureWriter:
        a = self._settings.azure
        session = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=a.max_connections, limit_per_host=0),
                auto_decompress=False,
            )
        )
        self._transport = AioHttpTransport(session=session, session_owner=False)
        kwargs: dict[str, Any] = {
            "transport": self._transport,
            "retry_total": 0,
            "connection_timeout": self._settings.retry.connect_timeout_s,
            "read_timeout": self._settings.retry.stall_timeout_s,
            "max_single_put_size": 4000 * 1024 * 1024,
        }
        if a.connection_string is not None:
            self._service = BlobServiceClient.from_connection_string(
                a.connection_string.get_secret_value(), **kwargs
            )
        elif a.account_url is not None:
            credential: Any
            if a.account_key is not None:
                name = _account_name(a.account_url)
                credential = {"account_name": name, "account_key": a.account_key.get_secret_value()}
            elif a.sas_token is not None:
                credential = a.sas_token.get_secret_value()
            else:
                from azure.identity.aio import DefaultAzureCredential

                credential = await self._stack.enter_async_context(DefaultAzureCredential())
                self._token_credential = True
            self._service = BlobServiceClient(a.account_url, credential=credential, **kwargs)
        else:
            raise PermanentError("no Azure account configured")
        await self._stack.enter_async_context(self._service)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _blob(self, dst: AzAddress) -> BlobClient:
        assert self._service is not None
        if dst.account_url is not None and dst.account_url.rstrip("/") != self._service.url.rstrip(
            "/"
        ):
            raise PermanentError(
                f"{dst}: the destination account is not the configured one "
                f"({self._service.account_name}); configure its credentials or use az://"
            )
        return self._service.get_blob_client(dst.container, dst.blob)

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        try:
            p = await self._blob(dst).get_blob_properties()
        except ResourceNotFoundError as e:
            if _code(e) == "ContainerNotFound":
                raise _translate(e, dst, "read properties") from None
            return None
        except AzureError as e:
            raise _translate(e, dst, "read properties") from None
        return ExistingBlob(size=p.size, metadata=dict(p.metadata or {}))

    async def put(
        self,
        dst: AzAddress,
        data: Chunks,
        md5: bytes,
        headers: BlobHeaders,
        metadata: dict[str, str],
        overwrite: bool,
        tier: str | None = None,
    ) -> None:
        """The whole blob in one Put Blob, checked by Azure against ``md5``."""
        try:
            await self._blob(dst).upload_blob(
                data.join(),  # the SDK wants bytes here; at most one block
                length=data.size,
                overwrite=overwrite,
                content_settings=headers.settings(md5),
                metadata=metadata,
                transactional_content_md5=md5,
                standard_blob_tier=StandardBlobTier(tier) if tier else None,
            )
        except ResourceExistsError:
            raise DestinationExistsError(dst) from None
        except AzureError as e:
            raise _translate(e, dst, "put blob") from None

    async def stage(self, dst: AzAddress, block_id: str, data: Chunks, md5: bytes) -> None:
        try:
            await self._blob(dst).stage_block(
                block_id,
                cast(bytes, _stream(data)),
                length=data.size,
                transactional_content_md5=md5,
            )
        except AzureError as e:
            raise _translate(e, dst, f"stage block {block_id}") from None

    async def stage_from_url(
        self, dst: AzAddress, block_id: str, url: str, offset: int, length: int
    ) -> None:
        """Azure fetches the range itself: no payload byte passes through this host."""
        try:
            await self._blob(dst).stage_block_from_url(
                block_id, url, source_offset=offset, source_length=length
            )
        except AzureError as e:
            code = _code(e)
            if code.startswith("CannotVerifyCopySource"):
                raise SourceUnreachableError(dst, code) from None
            raise _translate(e, dst, f"stage block {block_id} from URL") from None

    async def staged_blocks(self, dst: AzAddress) -> dict[str, int]:
        """Uncommitted blocks already on the destination: {block id: size}."""
        try:
            _, uncommitted = await self._blob(dst).get_block_list("uncommitted")
        except ResourceNotFoundError as e:
            if _code(e) == "ContainerNotFound":
                raise _translate(e, dst, "list blocks") from None
            return {}
        except AzureError as e:
            raise _translate(e, dst, "list blocks") from None
        return {b.id: b.size for b in uncommitted}

    async def commit(
        self,
        dst: AzAddress,
        block_ids: list[str],
        md5: bytes | None,
        headers: BlobHeaders,
        metadata: dict[str, str],
        overwrite: bool,
        tier: str | None = None,
    ) -> None:
        conditions: dict[str, Any] = (
            {} if overwrite else {"etag": "*", "match_condition": MatchConditions.IfMissing}
        )
        try:
            await self._blob(dst).commit_block_list(
                [BlobBlock(block_id=i) for i in block_ids],
                content_settings=headers.settings(md5),
                metadata=metadata,
                standard_blob_tier=StandardBlobTier(tier) if tier else None,
                **conditions,
            )
        except ResourceExistsError:
            raise DestinationExistsError(dst) from None
        except HttpResponseError as e:
            if e.status_code == 412 and not overwrite:
                raise DestinationExistsError(dst) from None
            raise _translate(e, dst, "commit block list") from None
        except AzureError as e:
            raise _translate(e, dst, "commit block list") from None


def _account_name(account_url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(account_url)
    path = parts.path.strip("/")
    return path.split("/")[0] if path else parts.netloc.split(".")[0]


def _code(e: AzureError) -> str:
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")  # the SDK's enum, or a plain string


def _translate(e: AzureError, dst: AzAddress, what: str) -> Exception:
    code = _code(e)
    status = getattr(e, "status_code", None) or 0
    where = f"{dst}: {what}"
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return RetryableError(f"{where}: connection failed ({type(e).__name__})")
    if code == "ContainerNotFound":
        return PermanentError(f"{where}: container {dst.container!r} does not exist")
    if isinstance(e, ClientAuthenticationError) or code in (
        "AuthorizationFailure",
        "AuthenticationFailed",
        "AuthorizationPermissionMismatch",
    ):
        return PermanentError(
            f"{where}: Azure refused the credentials ({code or status}); check the account "
            "key, SAS token or identity and its permissions on the container"
        )
    if code in ("Md5Mismatch", "Crc64Mismatch"):
        return CorruptBlockError(f"{where}: Azure received damaged bytes ({code})")
    if code in _RETRYABLE_CODES or status >= 500 or status in (408, 429):
        return RetryableError(f"{where}: Azure answered {status} {code}")
    if code in ("InvalidResourceName", "InvalidBlobOrBlock", "InvalidUri"):
        return PermanentError(f"{where}: Azure rejected the name ({code})")
    if code == "InvalidMetadata":
        return PermanentError(f"{where}: Azure rejected the metadata ({code})")
    return PermanentError(f"{where}: Azure answered {status} {code or type(e).__name__}")
