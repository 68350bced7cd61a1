"""The Azure side: stage, commit, block lists, properties.

The SDK's own retries are switched off (``retry_total=0``): retries happen in one
place, per block, in transfer.py, with a policy the settings control. Every SDK error
is translated here into a RetryableError or a PermanentError with a message a person
can act on; SDK messages are not passed through, so no URL or token can leak.

The three requests made once per object or per block (Put Blob, Put Block and Get Blob
Properties) skip the SDK's client objects and policy pipeline, which cost about 2 ms of
CPU per request (half the daemon's work on small objects): they go straight to aiohttp,
authorized by the SDK's own credential policy, so what Azure sees is what the SDK would
send: the shared-key signature byte for byte, the SAS token, or an Azure AD bearer token
from the SDK's token policy, which caches it and asks the credential for a new one five
minutes before it expires (so a transfer of days outlives any one token). Everything
else goes through the SDK.
"""

from __future__ import annotations

import asyncio
import base64
import email.message
import email.utils
import hashlib
import re
import time
import unicodedata
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from types import TracebackType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import structlog
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
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy
from azure.core.pipeline.transport import AioHttpTransport, HttpRequest
from azure.storage.blob import BlobBlock, ContentSettings, StandardBlobTier
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from daemon.clock import refused_for_time
from daemon.errors import CorruptBlockError, PermanentError, RetryableError, connection_failed
from daemon.jobs import AzAddress, account_name
from daemon.latency import RoundTrips
from daemon.proxies import Proxies, refused_by_proxy
from daemon.s3 import Chunks
from daemon.settings import Settings

log = structlog.get_logger("blobferry")

_RETRYABLE_CODES = {"ServerBusy", "InternalError", "OperationTimedOut", "ServiceUnavailable"}
# Refusals a person can act on, by Azure's error code: what is wrong and what to do.
_LEASED = "the blob has an active lease; break or release it, or let it expire"
_TIER = "Azure refused the access tier; change the job's 'tier' or the 'tiers' setting"
_WHY = {
    "InvalidResourceName": "Azure rejected the name",
    "InvalidBlobOrBlock": "Azure rejected the name or a block",
    "InvalidUri": "Azure rejected the name",
    "InvalidMetadata": "Azure rejected the metadata",
    "InvalidBlobType": "a page or append blob holds this name and blocks cannot be staged "
    "into it; delete it or choose another destination",
    "LeaseIdMissing": _LEASED,
    "LeaseIdMismatchWithBlobOperation": _LEASED,
    "BlobImmutableDueToPolicy": "the blob is immutable (a retention policy or legal hold)",
    "ContainerBeingDeleted": "the container is being deleted, which takes Azure 30 s or "
    "more; submit the job again once it is gone",
    "InvalidBlobTier": _TIER,
    "BlobAccessTierNotSupportedForAccountType": _TIER,
}
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
        """As the SDK takes them (commit, and the SDK's Put Blob)."""
        return ContentSettings(
            content_type=self.content_type or _DEFAULT_TYPE,
            content_encoding=self.content_encoding,
            content_language=self.content_language,
            content_disposition=self.content_disposition,
            cache_control=self.cache_control,
            content_md5=bytearray(md5) if md5 is not None else None,
        )

    def headers(self, md5: bytes | None) -> dict[str, str]:
        """As Put Blob's ``x-ms-blob-*`` headers (the direct path)."""
        out = {"x-ms-blob-content-type": self.content_type or _DEFAULT_TYPE}
        for name, value in (
            ("x-ms-blob-content-encoding", self.content_encoding),
            ("x-ms-blob-content-language", self.content_language),
            ("x-ms-blob-content-disposition", self.content_disposition),
            ("x-ms-blob-cache-control", self.cache_control),
            ("x-ms-blob-content-md5", base64.b64encode(md5).decode() if md5 else None),
        ):
            if value is not None:
                out[name] = value
        return out


_DEFAULT_TYPE = "application/octet-stream"


class BlobId(NamedTuple):
    """One blob, whichever address spelled it."""

    account: str
    container: str
    blob: str


@dataclass(frozen=True, slots=True)
class ExistingBlob:
    size: int
    metadata: dict[str, str]


class SourceUnreachableError(PermanentError):
    """Azure could not fetch the source URL itself (Put Block From URL)."""

    def __init__(self, dst: AzAddress, code: str) -> None:
        super().__init__(f"{dst}: Azure could not read the source URL ({code})")
        self.code = code


class NotPermittedError(PermanentError):
    """The credentials are good but lack a permission (a write-only SAS reading, say)."""

    def __init__(self, dst: AzAddress, what: str) -> None:
        super().__init__(
            f"{dst}: {what}: the credentials are not permitted to do this "
            "(AuthorizationPermissionMismatch); grant it on the container"
        )


class ContainerMissingError(PermanentError):
    """The destination's container does not exist (and was not to be created)."""

    def __init__(self, where: str, container: str) -> None:
        super().__init__(
            f"{where}: container {container!r} does not exist; create it, or set "
            "azure.create_containers = true"
        )


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


# RFC 8187's attr-char: what an ext-value may carry as it is; the rest is %-encoded.
_ATTR_CHARS = "!#$&+-.^_`|~"


def ascii_disposition(value: str) -> str | None:
    """A Content-Disposition holding non-ASCII (an uploader's file name in UTF-8) as
    RFC 6266 writes it for HTTP: each such parameter as ``name*=UTF-8''%XX...``, a file
    name also as an ASCII ``filename=`` for clients that know no better. Azure refuses
    non-ASCII in a header, so the whole value used to be left off the blob. None when
    ``value`` has no disposition type to keep.

    HTTP reads header bytes as Latin-1: UTF-8 arrives as mojibake ("cafÃ©") and is
    decoded back; a value that is not UTF-8 underneath is the Latin-1 it reads as."""
    try:
        text = value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        text = value
    kind, _, rest = text.partition(";")
    kind = kind.strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&+.^_`|~-]+", kind):
        return None
    message = email.message.Message()
    message["Content-Disposition"] = "x" + (";" + rest if rest else "")
    params: dict[str, str] = {}
    found: Sequence[tuple[str, object]] = message.get_params([], header="content-disposition")
    for key, raw in found[1:]:
        if isinstance(raw, tuple):  # key*=charset''value (RFC 2231): it wins
            params[key.lower()] = email.utils.collapse_rfc2231_value(cast(Any, raw))
        else:
            params.setdefault(key.lower(), email.utils.unquote(str(raw)))
    out = [kind]
    for key, v in params.items():
        if v.isascii() and v.isprintable():
            out.append(f"{key}={_quoted(v)}")
            continue
        if key == "filename":  # the plain one first: a client takes the last it knows
            plain = unicodedata.normalize("NFKD", v).encode("ascii", "ignore").decode()
            out.append(f"filename={_quoted(''.join(c if c.isprintable() else '_' for c in plain))}")
        out.append(f"{key}*=UTF-8''{quote(v, safe=_ATTR_CHARS)}")
    return "; ".join(out)


def _quoted(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


# aiohttp warns about any raw-bytes body over 1 MiB: the SDK's Put Block List of tens of
# thousands of blocks is one (its XML, a few MiB). The direct path's bodies over 256 KiB
# go as the chunks they arrived in instead.
warnings.filterwarnings("ignore", "Sending a large body directly", ResourceWarning)


class AzureWriter:
    """Writes blobs. Use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._service: BlobServiceClient | None = None
        self._transport: AioHttpTransport | None = None
        self._session: aiohttp.ClientSession | None = None
        self._direct: _Direct | None = None
        self.round_trips = RoundTrips()  # of direct HEADs: how near Azure is
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
        return self._direct.sas_expiry if self._direct is not None else None

    def _error(self, e: AzureError, dst: AzAddress, what: str) -> Exception:
        """The SDK's exception ``e`` as blobferry's, knowing this writer's credential."""
        return _translate(e, dst, what, self.sas_expiry)

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
        self._transport = AioHttpTransport(session=session, session_owner=False)
        kwargs: dict[str, Any] = {
            "transport": self._transport,
            "retry_total": 0,
            "connection_timeout": self._settings.retry.connect_timeout_s,
            "read_timeout": self._settings.retry.stall_timeout_s,
            "max_single_put_size": 4000 * 1024 * 1024,
        }
        if a.connection_string is not None:
            cs = a.connection_string.get_secret_value()
            # A client that sends nothing, only to read the endpoint the string names.
            self._route_sdk(BlobServiceClient.from_connection_string(cs).url, kwargs)
            self._service = BlobServiceClient.from_connection_string(cs, **kwargs)
        elif a.account_url is not None:
            self._route_sdk(a.account_url, kwargs)
            credential: Any
            if a.account_key is not None:
                name = account_name(a.account_url)
                credential = {"account_name": name, "account_key": a.account_key.get_secret_value()}
            elif a.sas_token is not None:
                credential = a.sas_token.get_secret_value()
            else:
                credential = await self._stack.enter_async_context(_Identity())
            self._service = BlobServiceClient(a.account_url, credential=credential, **kwargs)
        else:
            raise PermanentError("no Azure account configured")
        await self._stack.enter_async_context(self._service)
        self._session = session
        policy = self._service._credential_policy
        if not (
            policy is None
            or isinstance(policy, (SharedKeyCredentialPolicy, AsyncBearerTokenCredentialPolicy))
        ):
            raise PermanentError(f"unsupported Azure credential ({type(policy).__name__})")
        self._direct = _Direct(self._service, self._transport, policy)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _route_sdk(self, account_url: str, kwargs: dict[str, Any]) -> None:
        """The SDK's requests take the proxy (if any) the direct path takes."""
        proxy = self._proxies.route(account_url)
        if proxy is not None:
            kwargs["proxies"] = {account_url.partition("://")[0]: str(proxy)}

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

    async def _send(
        self,
        method: str,
        dst: AzAddress,
        what: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (201,),
        missing_ok: bool = False,
    ) -> Mapping[str, str] | None:
        """One request on the direct path: the response headers, or (``missing_ok``)
        None when the blob does not exist but its container does."""
        assert self._direct is not None and self._session is not None
        self._check_account(dst)
        try:
            url, headers = await self._direct.prepare(method, dst, query or {}, headers or {})
        except AzureError as e:  # the identity gave no token
            raise self._error(e, dst, what) from None
        again = self._direct.refused_before(headers)
        stall = self._settings.retry.stall_timeout_s
        try:
            # aiohttp has no write timeout: a peer that stops reading a block's body
            # would hold the request for ever. The deadline moves on with every piece
            # of the body handed to the socket, so it fires only after ``stall``
            # seconds without progress (the response itself is under sock_read).
            async with asyncio.timeout(stall) as deadline:
                if isinstance(body, Chunks):
                    body = _pieces(body)
                if isinstance(body, AsyncIterable):
                    body = _paced(body, deadline, stall)
                t0 = time.monotonic()
                async with self._session.request(
                    method,
                    url,
                    headers=headers,
                    proxy=self._proxies.route(url),
                    data=body,
                    timeout=self._timeout,
                    skip_auto_headers=("Content-Type",),  # it is signed: nothing may add one
                ) as r:
                    deadline.reschedule(None)
                    if method == "HEAD":
                        self.round_trips.record(time.monotonic() - t0)
                    if r.status in ok:
                        return r.headers
                    await r.read()
                    code = r.headers.get("x-ms-error-code", "")
        except TimeoutError:
            raise RetryableError(f"{dst}: {what}: no progress for {stall:g} s") from None
        except aiohttp.ClientHttpProxyError as e:
            raise refused_by_proxy(e.status, f"{dst}: {what}") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"{dst}: {what}: {connection_failed(e)}") from None
        if missing_ok and r.status == 404 and code in ("BlobNotFound", ""):
            return None  # a HEAD's 404 has no body; Azure still names the code in a header
        if r.status == 401 and not again and self._direct.drop_token(headers):
            # A bearer token refused (expired early, revoked): try again with a new one.
            # The same token handed back and refused again is the failure below.
            raise RetryableError(f"{dst}: {what}: Azure refused the token ({code or 401})")
        raise _failure(r.status, code, dst, what, self.sas_expiry, r.headers.get("Date"))

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
                if _code(e) != "ContainerAlreadyExists":  # ContainerBeingDeleted
                    raise self._error(e, dst, "create container") from None
            except AzureError as e:
                if _code(e) == "AuthorizationPermissionMismatch":
                    raise PermanentError(
                        f"{dst}: container {dst.container!r} does not exist and the "
                        "credentials may not create containers; create it, or grant "
                        "that permission"
                    ) from None
                raise self._error(e, dst, "create container") from None
            self._containers.add(dst.container)

    def forget_container(self, dst: AzAddress) -> None:
        self._containers.discard(dst.container)

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        h = await self._send("HEAD", dst, "read properties", ok=(200,), missing_ok=True)
        if h is None:
            return None
        metadata = {k[10:]: v for k, v in h.items() if k.lower().startswith("x-ms-meta-")}
        return ExistingBlob(size=int(h.get("Content-Length", 0)), metadata=metadata)

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
        request_headers = _put_headers(data.size, md5, headers, metadata, overwrite, tier)
        await self._send("PUT", dst, "put blob", headers=request_headers, body=_body(data))

    async def put_stream(
        self,
        dst: AzAddress,
        body: AsyncIterable[bytes],
        size: int,
        md5: bytes,
        headers: BlobHeaders,
        metadata: dict[str, str],
        overwrite: bool,
        tier: str | None = None,
    ) -> None:
        """The whole blob in one Put Blob whose body streams from ``body`` as it comes:
        Azure checks all ``size`` bytes against ``md5`` and stores nothing otherwise."""
        request_headers = _put_headers(size, md5, headers, metadata, overwrite, tier)
        await self._send("PUT", dst, "put blob", headers=request_headers, body=body)

    async def stage(self, dst: AzAddress, block_id: str, data: Chunks, md5: bytes) -> None:
        await self._send(
            "PUT",
            dst,
            f"stage block {block_id}",
            # The SDK base64-encodes block IDs on the way out and decodes them on the way
            # back (get_block_list): the same here.
            query={"comp": "block", "blockid": base64.b64encode(block_id.encode()).decode()},
            headers={
                "Content-Length": str(data.size),
                "Content-MD5": base64.b64encode(md5).decode(),
            },
            body=_body(data),
        )

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
            code = _code(e)
            if code.startswith("CannotVerifyCopySource"):
                raise SourceUnreachableError(dst, code) from None
            raise self._error(e, dst, f"stage block {block_id} from URL") from None

    async def staged_blocks(self, dst: AzAddress) -> dict[str, int]:
        """Uncommitted blocks already on the destination: {block id: size}."""
        try:
            _, uncommitted = await self._blob(dst).get_block_list("uncommitted")
        except ResourceNotFoundError as e:
            if _code(e) == "ContainerNotFound":
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
            yield [(b.name, ExistingBlob(b.size, dict(b.metadata or {}))) async for b in page]

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
        overwrite: bool,
        tier: str | None = None,
    ) -> None:
        conditions: dict[str, Any] = (
            {} if overwrite else {"match_condition": MatchConditions.IfMissing}
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
            raise self._error(e, dst, "commit block list") from None
        except AzureError as e:
            raise self._error(e, dst, "commit block list") from None


class TokenError(ClientAuthenticationError):
    """No Azure AD token: the identity failed (its endpoint, its setup), not Azure
    Storage, which never saw a request. ``passing``: the endpoint was down or busy."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(message=f"no Azure AD token ({type(cause).__name__})")
        status = getattr(cause, "status_code", None) or 0
        self.detail = f"{type(cause).__name__} {status}" if status else type(cause).__name__
        connection = isinstance(cause, (ServiceRequestError, ServiceResponseError))
        self.passing = connection or status >= 500 or status == 429


class _Identity:
    """azure-identity's DefaultAzureCredential, its failures raised as TokenError.

    Without this, a token endpoint that was down for a moment when a token was due
    (hourly, on a copy of days) failed the transfer as "Azure refused the credentials".
    Once a source has given a token, azure-identity asks it alone, and its errors keep
    the endpoint's HTTP status; the first time, the chain's error does not."""

    def __init__(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        self._inner = DefaultAzureCredential()

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        try:
            return await self._inner.get_token(*scopes, **kwargs)
        except AzureError as e:
            raise TokenError(e) from None

    async def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        try:
            return await self._inner.get_token_info(*scopes, options=options)
        except AzureError as e:
            raise TokenError(e) from None

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> _Identity:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)


class _Direct:
    """URLs and authorization for the direct path, built as the SDK builds them."""

    def __init__(
        self,
        service: BlobServiceClient,
        transport: AioHttpTransport | None,
        policy: SharedKeyCredentialPolicy | AsyncBearerTokenCredentialPolicy[Any, Any] | None,
    ) -> None:
        self._base = service.primary_endpoint.split("?")[0].rstrip("/")
        # The SAS token, when that is the credential (the SDK keeps it as a query string).
        self._sas = str(getattr(service, "_query_str", "")).lstrip("?")
        self.sas_expiry = _sas_expiry(self._sas)
        self._version = service.api_version
        self._policy = policy
        self._context = PipelineContext(transport)
        self._date = ("", 0)
        self._dropped: set[str] = set()  # digests of bearer tokens Azure refused

    def url(self, dst: AzAddress, query: Mapping[str, str]) -> str:
        """The blob's URL exactly as BlobClient.url writes it, plus ``query``."""
        url = f"{self._base}/{quote(dst.container.encode())}/{quote(dst.blob, safe='~/')}"
        params = [f"{k}={quote(v, safe='')}" for k, v in query.items()]
        if self._sas:
            params.append(self._sas)
        return f"{url}?{'&'.join(params)}" if params else url

    async def prepare(
        self, method: str, dst: AzAddress, query: Mapping[str, str], headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        url = self.url(dst, query)
        headers["x-ms-version"] = self._version
        headers["x-ms-date"] = self._now()
        if self._policy is not None:
            request = HttpRequest(method, url, headers=headers)
            signing = PipelineRequest(request, self._context)
            if isinstance(self._policy, AsyncBearerTokenCredentialPolicy):
                await self._policy.on_request(signing)  # a cached token, or a new one
            else:
                self._policy.on_request(signing)  # type: ignore[no-untyped-call]
            headers = dict(request.headers)
        return url, headers

    def _digest(self, sent: Mapping[str, str]) -> str:
        return hashlib.sha256(sent.get("Authorization", "").encode()).hexdigest()

    def refused_before(self, sent: Mapping[str, str]) -> bool:
        """Whether ``sent`` carries a bearer token dropped after a 401 and handed back."""
        return bool(self._dropped) and self._digest(sent) in self._dropped

    def drop_token(self, sent: Mapping[str, str]) -> bool:
        """After a 401: forget the bearer token ``sent`` carried, so that the next
        request asks the credential for one. False when no bearer token is in use."""
        if not isinstance(self._policy, AsyncBearerTokenCredentialPolicy):
            return False
        self._dropped.add(self._digest(sent))
        current = self._policy._token  # the SDK's cache; its own pipeline clears it on 401
        if current is not None and f"Bearer {current.token}" == sent.get("Authorization"):
            self._policy._token = None
        return True

    def _now(self) -> str:
        """x-ms-date, formatted once per wall-clock second."""
        now = time.time()
        if self._date[1] != int(now):
            self._date = (formatdate(now, usegmt=True), int(now))
        return self._date[0]


def _put_headers(
    size: int,
    md5: bytes,
    headers: BlobHeaders,
    metadata: dict[str, str],
    overwrite: bool,
    tier: str | None,
) -> dict[str, str]:
    """Put Blob's headers. The MD5 goes twice: Content-MD5 has Azure check the bytes
    on arrival, x-ms-blob-content-md5 is stored as the blob's Content-MD5."""
    out = {
        "x-ms-blob-type": "BlockBlob",
        "Content-Length": str(size),
        "Content-MD5": base64.b64encode(md5).decode(),
        **headers.headers(md5),
        **{f"x-ms-meta-{k}": v for k, v in metadata.items()},
    }
    if tier is not None:
        out["x-ms-access-tier"] = tier
    if not overwrite:
        out["If-None-Match"] = "*"
    return out


def _body(data: Chunks) -> bytes | Chunks:
    """A small body in one piece, a large one as the chunks it arrived in (no copy),
    which ``_send`` paces."""
    if data.size <= _PIECE:
        return data[0] if len(data) == 1 else data.join()
    return data


_PIECE = 256 * 1024


async def _pieces(data: Chunks) -> AsyncIterator[memoryview]:
    """A block's chunks in pieces of at most 256 KiB (views, not copies): aiohttp asks
    for the next one only when the socket took the last, so each piece is progress."""
    for chunk in data:
        view = memoryview(chunk)
        for at in range(0, len(view), _PIECE):
            yield view[at : at + _PIECE]


async def _paced(
    body: AsyncIterable[bytes | memoryview], deadline: asyncio.Timeout, stall: float
) -> AsyncIterator[bytes | memoryview]:
    """``body``, each piece moving the deadline ``stall`` seconds on. The wait for the
    next piece is not Azure's: a pipe's body is S3, whose reads have their own stall
    timer and may wait on the bandwidth cap, so the deadline is off meanwhile."""
    loop = asyncio.get_running_loop()
    pieces = aiter(body)
    while True:
        deadline.reschedule(None)
        try:
            piece = await anext(pieces)
        except StopAsyncIteration:
            break
        deadline.reschedule(loop.time() + stall)
        yield piece
    deadline.reschedule(loop.time() + stall)


def _sas_expiry(sas: str) -> datetime | None:
    """The end of a SAS token's validity (its ``se``), if it is one and says."""
    end = parse_qs(sas).get("se", [""])[0]
    try:
        when = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)


def _code(e: AzureError) -> str:
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")  # the SDK's enum, or a plain string


def _translate(
    e: AzureError, dst: AzAddress, what: str, sas_expiry: datetime | None = None
) -> Exception:
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return RetryableError(f"{dst}: {what}: {connection_failed(e.inner_exception or e)}")
    if isinstance(e, TokenError) and e.passing:
        return RetryableError(f"{dst}: {what}: the identity endpoint gave no token ({e.detail})")
    if isinstance(e, TokenError):
        return PermanentError(
            f"{dst}: {what}: no Azure AD token for this machine's identity ({e.detail}); "
            "check its managed identity (or azure-identity's other sources), or set "
            "azure.account_key or azure.sas_token"
        )
    status = getattr(e, "status_code", None) or 0
    if isinstance(e, ClientAuthenticationError) and status not in (401, 403):
        status = 403  # the SDK found the credential unusable before sending anything
    response = getattr(e, "response", None)
    date = response.headers.get("Date") if response is not None else None
    return _failure(status, _code(e) or type(e).__name__, dst, what, sas_expiry, date)


def _failure(
    status: int,
    code: str,
    dst: AzAddress,
    what: str,
    sas_expiry: datetime | None = None,
    date: str | None = None,
) -> Exception:
    """Azure's answer ``status`` with error code ``code``, as an error to act on.
    ``sas_expiry``: when the credential is a SAS token, its end (``se``); ``date``: the
    answer's Date header, Azure's time."""
    where = f"{dst}: {what}"
    if status == 407 and not code:  # a plain-http request, refused by the proxy itself
        return refused_by_proxy(407, where)
    if code == "ContainerNotFound":
        return ContainerMissingError(where, dst.container)
    if code == "BlobAlreadyExists":  # only a write conditional on absence gets this
        return DestinationExistsError(dst)
    if code == "AuthorizationPermissionMismatch":
        return NotPermittedError(dst, what)  # authenticated: the clock was right enough
    if status in (401, 403) and (skewed := refused_for_time(where, "Azure", date)):
        return skewed  # before the SAS check, which reads this machine's clock
    if status in (401, 403) or code in ("AuthorizationFailure", "AuthenticationFailed"):
        if sas_expiry is not None and sas_expiry <= datetime.now(UTC):
            # A transfer of days outlives a SAS of hours: say so, not "check the token".
            return PermanentError(
                f"{where}: the SAS token expired at {sas_expiry:%Y-%m-%d %H:%M:%S} UTC "
                f"({code or status}); put a new one in the settings, restart, and submit "
                "the job again: the blocks already staged are reused"
            )
        return PermanentError(
            f"{where}: Azure refused the credentials ({code or status}); check the account "
            "key, SAS token or identity and its permissions on the container"
        )
    if code in ("Md5Mismatch", "Crc64Mismatch"):
        return CorruptBlockError(f"{where}: Azure received damaged bytes ({code})")
    if code in _RETRYABLE_CODES or status >= 500 or status in (408, 429):
        return RetryableError(f"{where}: Azure answered {status} {code}")
    if code in _WHY:
        return PermanentError(f"{where}: {_WHY[code]} ({code})")
    return PermanentError(f"{where}: Azure answered {status} {code}".rstrip())
