"""The S3 side: head, list, presign and ranged reads.

Control calls (HEAD, LIST) go through aiobotocore, which refreshes credentials from the
standard chain (instance roles included). Payload goes through aiohttp on a URL that is
presigned immediately before each request and never reused: a URL signed with
temporary credentials dies with them, whatever its expiry says.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.utils import parse_timestamp
from yarl import URL

from daemon.bandwidth import Bandwidth
from daemon.clock import refused_for_time
from daemon.errors import (
    PermanentError,
    RetryableError,
    SourceChangedError,
    StallError,
    connection_failed,
)
from daemon.jobs import S3Address
from daemon.latency import RoundTrips
from daemon.proxies import Proxies, refused_by_proxy
from daemon.retry import retrying
from daemon.settings import Settings
from daemon.sigv4 import UrlShape, presign_get, signing_key

# Storage classes whose objects cannot be read until someone restores them.
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
_MD5_HEX = re.compile(r"[0-9a-f]{32}\Z")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REFUSED = (400, 401, 403)  # how S3 answers a request signed at the wrong time
_RETRYABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD (or a whole-object GET) tells about an object."""

    bucket: str
    key: str
    size: int
    etag: str  # with its quotes, exactly as S3 sends it: the If-Match value
    version_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_disposition: str | None = None
    cache_control: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None
    restore: str | None = None
    sse: str | None = None
    sse_customer: bool = False
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm -> base64 value
    checksum_type: str | None = None  # FULL_OBJECT or COMPOSITE

    @property
    def etag_is_md5(self) -> bool:
        """Whether the ETag can prove the bytes: an MD5, or a multipart composite of them."""
        return self.md5 is not None or (self.parts > 0 and not self.encrypted_etag)

    @property
    def md5(self) -> bytes | None:
        """The object's MD5, when its ETag is one: a single-part object, not encrypted
        with SSE-KMS or SSE-C."""
        bare = self.etag.strip('"')
        if self.encrypted_etag or not _MD5_HEX.match(bare):
            return None
        return bytes.fromhex(bare)

    @property
    def encrypted_etag(self) -> bool:
        """SSE-KMS and SSE-C objects have ETags that are not the MD5 of their bytes."""
        return self.sse_customer or (self.sse or "").startswith("aws:kms")

    @property
    def archived(self) -> bool:
        """In Glacier or Deep Archive and not restored: unreadable until someone restores it."""
        cold = self.storage_class in ARCHIVE_CLASSES
        return cold and 'ongoing-request="false"' not in (self.restore or "")

    def raise_if_unreadable(self) -> None:
        if self.archived:
            raise ArchivedObjectError(self.address, self.storage_class)

    @property
    def address(self) -> S3Address:
        return S3Address(self.bucket, self.key)

    @property
    def parts(self) -> int:
        """Parts of a multipart upload (from the ETag's ``-N``), or 0 for a single part."""
        bare = self.etag.strip('"')
        tail = bare.rpartition("-")[2]
        return int(tail) if "-" in bare and tail.isdigit() else 0


class Chunks(list[bytes]):
    """A block's bytes as received: a list of chunks, and their total size."""

    size: int = 0

    def join(self) -> bytes:
        return b"".join(self)


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    size: int
    etag: str
    storage_class: str | None = None


def info_from_headers(bucket: str, key: str, headers: Mapping[str, str]) -> ObjectInfo:
    h = {k.lower(): v for k, v in headers.items()}
    size = h.get("content-length", "0")
    if "content-range" in h:  # a ranged GET: the total is after the slash
        m = _CONTENT_RANGE.match(h["content-range"])
        if m and m.group(3) != "*":
            size = m.group(3)
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(size),
        etag=h.get("etag", ""),
        version_id=h.get("x-amz-version-id"),
        content_type=h.get("content-type"),
        content_encoding=h.get("content-encoding"),
        content_language=h.get("content-language"),
        content_disposition=h.get("content-disposition"),
        cache_control=h.get("cache-control"),
        metadata={k[11:]: v for k, v in h.items() if k.startswith("x-amz-meta-")},
        storage_class=h.get("x-amz-storage-class"),
        restore=h.get("x-amz-restore"),
        sse=h.get("x-amz-server-side-encryption"),
        sse_customer="x-amz-server-side-encryption-customer-algorithm" in h,
        checksums={
            k[15:]: v
            for k, v in h.items()
            if k.startswith("x-amz-checksum-") and k != "x-amz-checksum-type"
        },
        checksum_type=h.get("x-amz-checksum-type"),
    )


class QuerySigner:
    """SigV4 query presigning of object GETs, done here for each request.

    botocore resolves a bucket's URL once (endpoint rules, addressing style, region)
    by presigning a placeholder key; after that each URL is signed locally with the
    client's current credentials (frozen anew each time, so refreshed instance-role
    credentials are used as soon as botocore has them) in microseconds, where a full
    botocore presign costs about a millisecond. Anything unexpected in the resolved URL
    and the bucket is presigned by botocore every time instead.

    A URL must be signed for the bucket's own region, which need not be the configured
    one: botocore follows the redirect for its own calls, but a presigned URL is only
    refused (AuthorizationQueryParametersError). So the bucket's region is asked once
    (HEAD bucket, which names it even when it refuses) and a bucket elsewhere is signed
    by a client of its region, from ``regional``.
    """

    PLACEHOLDER = "__blobferry_key__"

    def __init__(
        self, client: Any, expires: int, regional: Callable[[str], Awaitable[Any]] | None = None
    ) -> None:
        self._client = client
        self._expires = expires
        self._regional = regional
        self._learnt: dict[str, asyncio.Future[tuple[Any, UrlShape | None]]] = {}
        self._known: dict[str, tuple[Any, UrlShape | None]] = {}  # what they taught
        self._keys: dict[tuple[str, str, str], bytes] = {}

    async def url(
        self, bucket: str, key: str, now: datetime | None = None, version_id: str | None = None
    ) -> str:
        """A GET of the key (of that version, if one is named), presigned now. The URL
        is encoded already: send it as it stands (see ``sigv4.presign_get``)."""
        client, shape = self._known.get(bucket) or await self._learning(bucket)
        if shape is None:
            return await self._botocore(client, bucket, key, version_id)
        credentials = client._get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        creds = await credentials.get_frozen_credentials()
        return self.sign(
            shape, key, creds.access_key, creds.secret_key, creds.token, now, version_id
        )

    async def _learning(self, bucket: str) -> tuple[Any, UrlShape | None]:
        """The first transfer from a bucket learns it; the others wait for that."""
        learnt = self._learnt.get(bucket)
        if learnt is None or (learnt.done() and (learnt.cancelled() or learnt.exception())):
            learnt = self._learnt[bucket] = asyncio.ensure_future(self._learn(bucket))
        self._known[bucket] = known = await asyncio.shield(learnt)
        return known

    async def _botocore(
        self, client: Any, bucket: str, key: str, version_id: str | None = None
    ) -> str:
        params = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        url: str = await client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self._expires
        )
        return url

    async def region(self, bucket: str) -> str | None:
        """The bucket's region, as S3 names it in a HEAD bucket's answer (a refusal and
        a redirect name it too); None when it is not named (no such bucket)."""
        try:
            response = await self._client.head_bucket(Bucket=bucket)
        except ClientError as e:
            response = e.response
        except (NoCredentialsError, PartialCredentialsError):
            raise
        except BotoCoreError as e:  # the connection or the credentials' renewal: retried
            raise RetryableError(f"s3://{bucket}: HEAD bucket: {e}") from None
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        named: str | None = headers.get("x-amz-bucket-region")
        return named

    async def _learn(self, bucket: str) -> tuple[Any, UrlShape | None]:
        client = self._client
        if self._regional is not None:
            region = await self.region(bucket)
            if region and region != client.meta.region_name:
                client = await self._regional(region)
        return client, await self._shape(client, bucket)

    async def _shape(self, client: Any, bucket: str) -> UrlShape | None:
        url = urlsplit(await self._botocore(client, bucket, self.PLACEHOLDER))
        query = dict(parse_qsl(url.query))
        scope = query.get("X-Amz-Credential", "").split("/")
        if (
            query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256"
            or query.get("X-Amz-SignedHeaders") != "host"
            or len(scope) != 5
            or url.path.count(self.PLACEHOLDER) != 1
            or set(query) - _SIGV4_PARAMS
        ):
            return None
        before, after = url.path.split(self.PLACEHOLDER)
        return UrlShape(url.scheme, url.netloc, before, after, scope[2], scope[3])

    def sign(
        self,
        shape: UrlShape,
        key: str,
        access_key: str,
        secret_key: str,
        token: str | None,
        now: datetime | None = None,
        version_id: str | None = None,
    ) -> str:
        return presign_get(
            shape,
            key,
            access_key,
            token,
            self._expires,
            now or datetime.now(UTC),
            lambda day: self._signing_key(secret_key, day, shape),
            version_id,
        )

    def _signing_key(self, secret: str, day: str, shape: UrlShape) -> bytes:
        cache_key = (secret, day, shape.region)
        found = self._keys.get(cache_key)
        if found is None:
            found = signing_key(secret, day, shape.region, shape.service)
            self._keys = {cache_key: found}  # one day, one secret: keep only the latest
        return found


_SIGV4_PARAMS = {
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
}


def _timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        botocores: datetime = parse_timestamp(value)  # HTTP dates, epoch seconds
        return botocores
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _error_code(body: bytes) -> tuple[str, str]:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


class S3Reader:
    """Reads objects from S3. Use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._proxies = Proxies()  # botocore finds its own, from the same variables
        self._signer: QuerySigner | None = None
        self.round_trips = RoundTrips()  # of HEADs: how near S3 is
        self.bandwidth = Bandwidth(settings.bandwidth)

    async def __aenter__(self) -> S3Reader:
        try:
            return await self._enter()
        except BaseException:
            await self._stack.aclose()  # whatever opened before the failure
            raise

    async def _enter(self) -> S3Reader:
        s = self._settings.s3
        session = get_session()
        # botocore parses every timestamp with dateutil: 5% of the event loop on a
        # listing of 400 objects. ISO 8601 (listings, STS) takes the fast path.
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_timestamp
        )
        if s.profile:
            session.set_config_variable("profile", s.profile)
        config = AioConfig(
            signature_version="s3v4",
            region_name=s.region,
            s3={"addressing_style": s.addressing_style},
            # One retry layer, blobferry's (retry.py): botocore's own under it made one
            # HEAD up to 5 x retry.attempts requests. (botocore's max_attempts counts
            # retries after the first; total_max_attempts counts them all.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self._settings.retry.connect_timeout_s,
            read_timeout=self._settings.retry.stall_timeout_s,
            max_pool_connections=16,
        )
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=s.endpoint_url, config=config)
        )
        regional: dict[str, Any] = {}
        creating = asyncio.Lock()

        async def client_in(region: str) -> Any:
            """A client like the first, for buckets that live in ``region``."""
            async with creating:
                if region not in regional:
                    regional[region] = await self._stack.enter_async_context(
                        session.create_client(
                            "s3",
                            endpoint_url=s.endpoint_url,
                            config=config.merge(AioConfig(region_name=region)),
                        )
                    )
            return regional[region]

        self._signer = QuerySigner(self._client, s.presign_expires_s, client_in)
        timeout = aiohttp.ClientTimeout(
            total=None,  # a block may take long on a slow link; stalls are caught below
            connect=self._settings.retry.connect_timeout_s,
            sock_read=self._settings.retry.stall_timeout_s,
        )
        self._http = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=timeout,
                auto_decompress=False,  # gzip-encoded objects must arrive byte for byte
                connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0),
                skip_auto_headers=("Accept-Encoding",),
            )
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    # -- control calls --------------------------------------------------------------

    async def head(self, address: S3Address, checksums: bool = False) -> ObjectInfo:
        """HEAD the object; with ``checksums``, ask for S3's additional checksums too."""
        extra = {"ChecksumMode": "ENABLED"} if checksums else {}
        t0 = time.monotonic()
        resp = await self._call(
            "HEAD",
            address,
            self._client.head_object,
            Bucket=address.bucket,
            Key=address.key,
            **extra,
        )
        self.round_trips.record(time.monotonic() - t0)
        return info_from_headers(
            address.bucket, address.key, resp["ResponseMetadata"]["HTTPHeaders"]
        )

    async def part_sizes(self, info: ObjectInfo) -> list[int]:
        """Sizes of the parts of a multipart object, in order (HEAD ?partNumber=N).

        No If-Match here (moto compares it with the part's ETag, S3 with the object's):
        every ranged GET carries it, and a layout taken from another version fails the
        composite-ETag check, so a change between these HEADs cannot slip through."""

        async def one(n: int) -> int:
            r = await self._call(
                f"HEAD part {n} of",
                info.address,
                self._client.head_object,
                Bucket=info.bucket,
                Key=info.key,
                PartNumber=n,
            )
            return int(r["ContentLength"])

        sizes: list[int] = []
        for start in range(1, info.parts + 1, 32):
            batch = range(start, min(start + 32, info.parts + 1))
            sizes += await asyncio.gather(*(one(n) for n in batch))
        return sizes

    async def pages(
        self, prefix: S3Address, first: int = 1000, then: int = 1000
    ) -> AsyncGenerator[list[Listed], None]:
        """Every object under the prefix, a page at a time, in key order; folder markers
        left out. The first page holds at most ``first`` keys, so transfers start before
        S3 has read out a thousand, and the next ones ``then`` (S3's most). Each page is
        asked for while the one before is being used, so a long listing never holds the
        transfers up between pages."""

        async def page(token: str | None, size: int) -> Any:
            args: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key, "MaxKeys": size}
            if token is not None:
                args["ContinuationToken"] = token
            return await retrying(
                lambda: self._call("LIST", prefix, self._client.list_objects_v2, **args),
                self._settings.retry,
                f"LIST {prefix}",
            )

        pending: asyncio.Future[Any] | None = asyncio.ensure_future(page(None, min(first, 1000)))
        try:
            while pending is not None:
                resp = await pending
                pending = None
                if resp.get("IsTruncated") and resp.get("NextContinuationToken"):
                    pending = asyncio.ensure_future(page(resp["NextContinuationToken"], then))
                yield [
                    Listed(o["Key"], o["Size"], o["ETag"], o.get("StorageClass"))
                    for o in resp.get("Contents", ())
                    if not (o["Key"].endswith("/") and o["Size"] == 0)
                ]
        finally:
            if pending is not None:  # closed early: the page asked for ahead is not needed
                pending.cancel()
                await asyncio.wait([pending])
                if not pending.cancelled():
                    pending.exception()  # retrieved, so asyncio does not warn about it

    async def _call(
        self, what: str, address: S3Address, call: Callable[..., Awaitable[Any]], **args: Any
    ) -> Any:
        """One botocore call, its failures turned into what a person can act on (or a
        RetryableError when trying again may help)."""
        try:
            return await call(**args)
        except ClientError as e:
            raise await self._explain(e, address) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise _no_credentials() from None
        except BotoCoreError as e:
            raise RetryableError(f"{what} {address}: {e}") from None

    async def _explain(self, e: ClientError, address: S3Address) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        meta = e.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", 0)
        if status in _REFUSED and (
            skewed := refused_for_time(str(address), "S3", meta.get("HTTPHeaders", {}).get("date"))
        ):
            return skewed
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            if code != "NoSuchBucket" and await self._bucket_exists(address.bucket):
                return PermanentError(f"{address}: no such key in bucket {address.bucket!r}")
            return PermanentError(f"{address}: bucket {address.bucket!r} does not exist")
        if code in ("412", "PreconditionFailed"):
            return SourceChangedError(str(address))
        if code == "SignatureDoesNotMatch":
            return _signature_refused(str(address))
        if code == "403":  # a HEAD's answer has no body, so botocore has only the status
            return PermanentError(
                f"{address}: S3 refused a HEAD with 403, which names no reason: the AWS "
                "credentials may not read this bucket, or their secret key is wrong, or "
                "something between here and S3 altered the request after it was signed"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId"):
            return PermanentError(
                f"{address}: access denied by S3 ({code}); check the AWS credentials "
                "and that they may read this bucket"
            )
        if code in _EXPIRED_CREDENTIALS:
            return _expired_credentials(str(address), code)
        if status == 407:
            return refused_by_proxy(407, str(address))
        if code == "400":  # a HEAD's answer has no body, so botocore has only the status
            return PermanentError(
                f"{address}: S3 answered a HEAD with 400 Bad Request, which names no "
                "reason: most often the AWS credentials are expired or invalid (check "
                "their source), or the object is encrypted with a customer-provided key "
                "(SSE-C), which blobferry cannot read"
            )
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return RetryableError(f"{address}: S3 answered {code or status}")
        return PermanentError(f"{address}: S3 answered {code or status}: {err.get('Message', '')}")

    async def _bucket_exists(self, bucket: str) -> bool:
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError:
            return False
        return True

    # -- payload ----------------------------------------------------------------------

    async def presign(self, info: ObjectInfo | S3Address) -> str:
        """A GET URL for the object, signed now: one per request, never reused. Given an
        ObjectInfo of a versioned object, the URL reads that version only, whatever is
        written over it since (server-side mode, where no If-Match can be sent)."""
        assert self._signer is not None
        version = info.version_id if isinstance(info, ObjectInfo) else None
        try:
            return await self._signer.url(info.bucket, info.key, version_id=version)
        except (NoCredentialsError, PartialCredentialsError):
            raise _no_credentials() from None
        except BotoCoreError as e:
            # Renewing the credentials failed: their source (instance metadata, a
            # container endpoint) was down or throttled us, which passes.
            raise RetryableError(f"{info}: renewing the AWS credentials: {e}") from None

    @asynccontextmanager
    async def _get(
        self, address: S3Address, headers: dict[str, str], what: str, status: int
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET of a URL presigned now, answered with ``status``: anything else, or a
        failed request, raises as blobferry's error. Only the request is guarded here:
        what the caller raises passes as is, and reading the body is _chunks' part."""
        url = await self.presign(address)
        assert self._http is not None
        async with AsyncExitStack() as stack:
            try:
                proxy = self._proxies.route(url)
                # Sent as signed: a str would be re-encoded by yarl on the way.
                resp = await stack.enter_async_context(
                    self._http.get(URL(url, encoded=True), headers=headers, proxy=proxy)
                )
                if resp.status != status:
                    await self._raise_for(resp, address, what)
            except TimeoutError:
                raise StallError(what, self._settings.retry.stall_timeout_s) from None
            except aiohttp.ClientHttpProxyError as e:
                raise refused_by_proxy(e.status, what) from None
            except aiohttp.ClientError as e:
                raise RetryableError(f"{what}: {connection_failed(e)}") from None
            yield resp

    async def read_range(self, info: ObjectInfo, start: int, length: int) -> Chunks:
        """Exactly ``length`` bytes from ``start`` of the version ``info`` describes."""
        headers = {"Range": f"bytes={start}-{start + length - 1}", "If-Match": info.etag}
        what = f"GET {info.address} bytes {start}-{start + length - 1}"
        async with self._get(info.address, headers, what, 206) as resp:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start or int(m.group(2)) != start + length - 1:
                raise RetryableError(f"{what}: answered with the wrong range")
            return await self._read_exactly(resp, length, what)

    async def read_object(self, listed: Listed, address: S3Address) -> tuple[ObjectInfo, Chunks]:
        """A whole small object in one GET, its headers standing in for a HEAD."""
        what = f"GET {address}"
        async with self._get(address, {"If-Match": listed.etag}, what, 200) as resp:
            info = info_from_headers(address.bucket, address.key, resp.headers)
            return info, await self._read_exactly(resp, info.size, what)

    @asynccontextmanager
    async def open_object(self, info: ObjectInfo) -> AsyncIterator[AsyncIterator[bytes]]:
        """The whole object as a stream of chunks, as they arrive (for a pipe). Errors
        of the request raise here; errors while reading raise from the iteration."""
        what = f"GET {info.address}"
        async with self._get(info.address, {"If-Match": info.etag}, what, 200) as resp:
            if resp.content_length != info.size:
                raise SourceChangedError(str(info.address))
            yield self._chunks(resp, info.size, what)

    async def _chunks(
        self, resp: aiohttp.ClientResponse, length: int, what: str
    ) -> AsyncIterator[bytes]:
        """Exactly ``length`` bytes of the body, in the chunks aiohttp received them in."""
        got = 0
        bandwidth = self.bandwidth
        try:
            while got < length:
                chunk = await resp.content.readany()
                if not chunk:
                    raise RetryableError(f"{what}: connection closed after {got} of {length} bytes")
                got += len(chunk)
                if got > length:
                    raise RetryableError(f"{what}: more bytes than asked for")
                if bandwidth.on:
                    # While this waits, aiohttp reads on until its buffer is full, then
                    # pauses the socket and its stall timer: the wait is no stall.
                    await bandwidth.take(len(chunk))
                yield chunk
        except TimeoutError:
            raise StallError(what, self._settings.retry.stall_timeout_s) from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"{what}: {type(e).__name__}: {e}") from None

    async def _read_exactly(self, resp: aiohttp.ClientResponse, length: int, what: str) -> Chunks:
        # The block is the chunks aiohttp already allocated, kept as they are: hashing
        # and uploading walk the list, so no byte is copied into another buffer.
        chunks = Chunks()
        async for chunk in self._chunks(resp, length, what):
            chunks.append(chunk)
        chunks.size = length
        return chunks

    async def _raise_for(self, resp: aiohttp.ClientResponse, address: S3Address, what: str) -> None:
        body = await resp.read()
        code, message = _error_code(body)
        if resp.status == 412:
            raise SourceChangedError(str(address))
        if code == "InvalidObjectState":
            raise ArchivedObjectError(address, None)
        if resp.status in _REFUSED and (
            skewed := refused_for_time(what, "S3", resp.headers.get("Date"))
        ):
            raise skewed
        if resp.status == 200:
            raise PermanentError(f"{what}: the endpoint ignored the Range header")
        if resp.status == 416:
            raise SourceChangedError(str(address))
        if code in _EXPIRED_CREDENTIALS:
            raise _expired_credentials(what, code)
        if resp.status == 403 and "expired" in message.lower():
            # Presigned just now, so the clock or the credentials moved: sign again.
            raise RetryableError(f"{what}: presigned URL expired")
        if resp.status == 404:
            raise PermanentError(f"{what}: {code or 'not found'}")
        if resp.status == 407:  # a plain-http request, refused by the proxy itself
            raise refused_by_proxy(407, what)
        if code == "SignatureDoesNotMatch":
            raise _signature_refused(what)
        if resp.status == 403:
            # S3's message names the cause a person can act on, e.g. a missing
            # kms:Decrypt permission on an SSE-KMS object; it holds no secret.
            said = f": {message}" if message else ""
            raise PermanentError(
                f"{what}: access denied by S3 ({code or 403}{said}); check the AWS "
                "credentials and their permissions (KMS keys included)"
            )
        if code in _RETRYABLE_CODES or resp.status >= 500 or resp.status == 429:
            raise RetryableError(f"{what}: S3 answered {resp.status} {code}".rstrip())
        raise PermanentError(f"{what}: S3 answered {resp.status} {code}: {message}")


class ArchivedObjectError(PermanentError):
    def __init__(self, address: S3Address, storage_class: str | None) -> None:
        super().__init__(
            f"{address} is archived ({storage_class or 'InvalidObjectState'}) and not "
            "restored; restore it in S3 first, then submit the job again"
        )


_EXPIRED_CREDENTIALS = ("ExpiredToken", "TokenRefreshRequired")


def _expired_credentials(what: str, code: str) -> RetryableError:
    # botocore renews credentials before they end, so a refusal means their source
    # (instance metadata, a container endpoint, a profile) stopped renewing them.
    return RetryableError(
        f"{what}: S3 refused the AWS credentials as expired ({code}); check that their "
        "source (instance role, container endpoint, profile) renews them"
    )


def _signature_refused(what: str) -> PermanentError:
    # S3 says only that the signatures differ: a wrong secret and a request altered
    # after signing (by a proxy, or a client re-encoding the URL) look the same to it.
    return PermanentError(
        f"{what}: S3 refused the request's signature (SignatureDoesNotMatch): either the "
        "secret access key is not the one of the access key ID, or something between "
        "here and S3 (a proxy, a load balancer) altered the request's URL or Host after "
        "it was signed"
    )


def _no_credentials() -> PermanentError:
    return PermanentError(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "a profile (s3.profile), or run with an instance role"
    )
