"""The Azure side's detour around the SDK, for the three requests made once per object
or per block: Put Blob, Put Block and Get Blob Properties.

Why: the SDK's client objects and policy pipeline cost about 2 ms of CPU per request,
half the daemon's work on small objects (measured with py-spy on the benchmark's many
scenario). These go straight to aiohttp, or with a body from a block's buffer, to
http1.py (which says why), authorized by the SDK's own credential policy,
so what Azure sees is what the SDK would send: the shared-key signature byte for byte,
the SAS token, or an Azure AD bearer token from the SDK's token policy, which caches it
and asks the credential for a new one five minutes before it expires (so a transfer of
days outlives any one token). Everything else goes through the SDK.

A shared key signs here, by the SDK's rules but with the order of the x-ms- headers
kept per set of names: the SDK's policy sorts them with a per-character collation in
Python (signing here: 19 us a request, against the policy's 49). It leans on private parts of
azure-storage-blob (the service's ``_query_str``, the bearer policy's ``_token``, the
collation); tests/test_azure_direct.py fails when an upgrade changes them, the
signatures or the URLs the SDK writes. ``azure.direct = false`` sends these requests through
the SDK instead (azure.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import time
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from azure.core.exceptions import AzureError
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy
from azure.core.pipeline.transport import AioHttpTransport, HttpRequest
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy, compare
from azure.storage.blob.aio import BlobServiceClient
from yarl import URL

from daemon.addresses import AzAddress
from daemon.azure_errors import failure, sas_expiry, translate
from daemon.blockcheck import BlockCheck
from daemon.chunks import PIECE, Chunks, pieces
from daemon.errors import RetryableError, connection_failed
from daemon.http1 import Connections
from daemon.latency import RoundTrips
from daemon.properties import BlobHeaders
from daemon.proxies import Proxies, refused_by_proxy
from daemon.seams import ExistingBlob, Precondition

# aiohttp warns about any raw-bytes body over 1 MiB: the SDK's Put Block List of tens of
# thousands of blocks is one (its XML, a few MiB). The direct path's bodies over 1 MiB
# go as the chunks they arrived in instead.
warnings.filterwarnings("ignore", "Sending a large body directly", ResourceWarning)

# The standard headers a shared key signs, in order ("byte_range" is the SDK's: never sent).
_SIGNED = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "byte_range",
)


@functools.lru_cache(maxsize=1024)
def _collated(names: tuple[str, ...]) -> tuple[str, ...]:
    """x-ms- header names in the order the service sorts them (the SDK's collation)."""
    return tuple(sorted(names, key=functools.cmp_to_key(compare)))


def shared_key(account: str, key: bytes, method: str, url: str, headers: Mapping[str, str]) -> str:
    """The Authorization header SharedKeyCredentialPolicy writes for this request. The
    canonical resource is the path as yarl requotes it, which is how aiohttp sends the
    URL and how DirectPath hands it to http1.py."""
    lower = {k.lower(): v for k, v in headers.items() if v}
    if lower.get("content-length") == "0":
        del lower["content-length"]
    ms = {k.lower(): v for k, v in headers.items() if k.startswith("x-ms-")}
    parts = urlsplit(url)
    query = sorted(
        {p[0]: p[-1] for p in (q.partition("=") for q in parts.query.split("&"))}.items()
        if parts.query
        else ()
    )
    text = "".join(
        (
            method,
            "\n",
            "\n".join(lower.get(x, "") for x in _SIGNED),
            "\n",
            "".join(f"{k}:{ms[k]}\n" for k in _collated(tuple(sorted(ms)))),
            f"/{account}{URL(parts.path)}",
            "".join(f"\n{k.lower()}:{unquote(v)}" for k, v in query),
        )
    )
    digest = hmac.digest(key, text.encode(), "sha256")
    return f"SharedKey {account}:{base64.b64encode(digest).decode()}"


class Direct:
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
        self.sas_expiry = sas_expiry(self._sas)
        self._version = service.api_version
        self._policy = policy
        self._key: tuple[str, bytes] | None = None
        if isinstance(policy, SharedKeyCredentialPolicy):
            self._key = (policy.account_name, base64.b64decode(policy.account_key))
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
        if self._key is not None:
            headers["Authorization"] = shared_key(*self._key, method, url, headers)
        elif self._policy is not None:
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


class DirectPath:
    """Put Blob, Put Block and Get Blob Properties, sent as the SDK would: a body from
    a block's buffer by ``conns`` (unless None, or through an egress proxy), the rest
    by aiohttp."""

    def __init__(
        self,
        direct: Direct,
        session: aiohttp.ClientSession,
        conns: Connections | None,
        proxies: Proxies,
        stall_s: float,
        timeout: aiohttp.ClientTimeout,
        round_trips: RoundTrips,
    ) -> None:
        self._direct = direct
        self._session = session
        self._conns = conns
        self._proxies = proxies
        self._stall_s = stall_s
        self._timeout = timeout
        self.round_trips = round_trips

    @property
    def sas_expiry(self) -> Any:
        return self._direct.sas_expiry

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        h = await self._send("HEAD", dst, "read properties", ok=(200,), missing_ok=True)
        if h is None:
            return None
        metadata = {k[10:]: v for k, v in h.items() if k.lower().startswith("x-ms-meta-")}
        return ExistingBlob(
            size=int(h.get("Content-Length", 0)), metadata=metadata, etag=h.get("ETag", "")
        )

    async def put(
        self, dst: AzAddress, body: Chunks | AsyncIterable[bytes], headers: dict[str, str]
    ) -> None:
        await self._send("PUT", dst, "put blob", headers=headers, body=body)

    async def stage(self, dst: AzAddress, block_id: str, data: Chunks, check: BlockCheck) -> None:
        await self._send(
            "PUT",
            dst,
            f"stage block {block_id}",
            # The SDK base64-encodes block IDs on the way out and decodes them on the way
            # back (get_block_list): the same here.
            query={"comp": "block", "blockid": base64.b64encode(block_id.encode()).decode()},
            headers={
                "Content-Length": str(data.size),
                **check.headers(),
            },
            body=data,
        )

    async def _send(
        self,
        method: str,
        dst: AzAddress,
        what: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: Chunks | AsyncIterable[bytes] | None = None,
        ok: tuple[int, ...] = (201,),
        missing_ok: bool = False,
    ) -> Mapping[str, str] | None:
        """One request on the direct path: the response headers, or (``missing_ok``)
        None when the blob does not exist but its container does."""
        try:
            url, headers = await self._direct.prepare(method, dst, query or {}, headers or {})
        except AzureError as e:  # the identity gave no token
            raise translate(e, dst, what, self.sas_expiry) from None
        again = self._direct.refused_before(headers)
        said: Mapping[str, str]
        if isinstance(body, Chunks) and self._conns is not None and not self._proxies.route(url):
            # The URL as aiohttp sends it (yarl requotes the path), which is the form
            # Azure's signature check has taken from the SDK all along.
            answer = await self._conns.put(str(URL(url)), headers, body, f"{dst}: {what}")
            status, said = answer.status, answer.headers
        else:
            status, said = await self._by_aiohttp(method, url, headers, body, dst, what)
        if status in ok:
            return said
        code = said.get("x-ms-error-code") or ""
        if missing_ok and status == 404 and code in ("BlobNotFound", ""):
            return None  # a HEAD's 404 has no body; Azure still names the code in a header
        if status == 401 and not again and self._direct.drop_token(headers):
            # A bearer token refused (expired early, revoked): try again with a new one.
            # The same token handed back and refused again is the failure below.
            raise RetryableError(f"{dst}: {what}: Azure refused the token ({code or 401})")
        raise failure(status, code, dst, what, self.sas_expiry, said.get("Date"))

    async def _by_aiohttp(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Chunks | AsyncIterable[bytes] | None,
        dst: AzAddress,
        what: str,
    ) -> tuple[int, Mapping[str, str]]:
        stall = self._stall_s
        try:
            # aiohttp has no write timeout: a peer that stops reading a block's body
            # would hold the request for ever. The deadline moves on with every piece
            # of the body handed to the socket, so it fires only after ``stall``
            # seconds without progress (the response itself is under sock_read).
            async with asyncio.timeout(stall) as deadline:
                sent: Any = body
                if isinstance(body, Chunks):
                    sent = _body(body)
                    if isinstance(sent, Chunks):
                        sent = _pieces(sent)
                if isinstance(sent, AsyncIterable):
                    sent = _paced(sent, deadline, stall)
                t0 = time.monotonic()
                async with self._session.request(
                    method,
                    url,
                    headers=headers,
                    proxy=self._proxies.route(url),
                    data=sent,
                    timeout=self._timeout,
                    skip_auto_headers=("Content-Type",),  # it is signed: nothing may add one
                ) as r:
                    deadline.reschedule(None)
                    if method == "HEAD":
                        self.round_trips.record(time.monotonic() - t0)
                    await r.read()
                    return r.status, r.headers
        except TimeoutError:
            raise RetryableError(f"{dst}: {what}: no progress for {stall:g} s") from None
        except aiohttp.ClientHttpProxyError as e:
            raise refused_by_proxy(e.status, f"{dst}: {what}") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"{dst}: {what}: {connection_failed(e)}") from None


def put_headers(
    size: int,
    check: BlockCheck,
    headers: BlobHeaders,
    metadata: dict[str, str],
    when: Precondition,
    tier: str | None,
) -> dict[str, str]:
    """Put Blob's headers. An MD5 goes twice: Content-MD5 has Azure check the bytes on
    arrival, x-ms-blob-content-md5 is stored as the blob's Content-MD5. A CRC64 is
    checked only: Put Blob stores the MD5 of what arrived as the blob's Content-MD5 when
    none is sent (Azure's Get Blob reference; Azurite does the same), and Azure refuses
    a Put Blob carrying both checks."""
    out = {
        "x-ms-blob-type": "BlockBlob",
        "Content-Length": str(size),
        **check.headers(),
        **headers.headers(check.md5),
        **{f"x-ms-meta-{k}": v for k, v in metadata.items()},
    }
    if tier is not None:
        out["x-ms-access-tier"] = tier
    out.update(when.headers())
    return out


def _body(data: Chunks) -> bytes | bytearray | Chunks:
    """A small body in one piece, a large one as the chunks it arrived in (no copy),
    which ``_by_aiohttp`` paces."""
    if data.size <= PIECE:
        return data[0] if len(data) == 1 else data.join()
    return data


async def _pieces(data: Chunks) -> AsyncIterator[memoryview]:
    """A block's chunks in pieces of at most 1 MiB (views, not copies): aiohttp asks
    for the next one only when the socket took the last, so each piece is progress."""
    for piece in pieces(data):
        yield piece


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
