"""The S3 side: head, list, presign and ranged reads.

Control calls (HEAD, LIST) go through aiobotocore, which refreshes credentials from the
standard chain (instance roles included). Payload goes through aiohttp on a URL that is
presigned immediately before each request and never reused: a URL signed with
temporary credentials dies with them, whatever its expiry says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

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

from daemon.addresses import S3Address
from daemon.bandwidth import Bandwidth
from daemon.chunks import Chunks
from daemon.errors import (
    RetryableError,
    SourceChangedError,
    StallError,
    connection_failed,
)
from daemon.http1 import Connections
from daemon.latency import RoundTrips
from daemon.objects import CONTENT_RANGE, Listed, ObjectInfo, info_from_headers
from daemon.proxies import Proxies, refused_by_proxy
from daemon.retry import retrying
from daemon.s3_errors import explain, no_credentials, raise_for
from daemon.s3_signing import QuerySigner
from daemon.settings import Settings


def _timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        botocores: datetime = parse_timestamp(value)  # HTTP dates, epoch seconds
        return botocores
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


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
        self._bodies: Connections | None = None

    async def __aenter__(self) -> S3Reader:
        try:
            return await self._enter()
        except BaseException:
            await self._stack.aclose()  # whatever opened before the failure
            raise

    async def _enter(self) -> S3Reader:
        s = self._settings
        self._client, self._signer = await _clients(s, self._stack)
        timeout = aiohttp.ClientTimeout(
            total=None,  # a block may take long on a slow link; stalls are caught below
            connect=s.retry.connect_timeout_s,
            sock_read=s.retry.stall_timeout_s,
        )
        self._http = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=timeout,
                auto_decompress=False,  # gzip-encoded objects must arrive byte for byte
                connector=aiohttp.TCPConnector(limit=s.s3.max_connections, limit_per_host=0),
                skip_auto_headers=("Accept-Encoding",),
            )
        )
        self._bodies = Connections(
            s.retry.connect_timeout_s, s.retry.stall_timeout_s, s.s3.max_connections
        )
        self._stack.callback(self._bodies.close)
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

    async def put_small(self, address: S3Address, data: bytes, content_type: str) -> None:
        """A small object written whole (a queue job's report, under sqs.results)."""
        await self._call(
            "PUT",
            address,
            self._client.put_object,
            Bucket=address.bucket,
            Key=address.key,
            Body=data,
            ContentType=content_type,
        )

    async def _call(
        self, what: str, address: S3Address, call: Callable[..., Awaitable[Any]], **args: Any
    ) -> Any:
        """One botocore call, its failures turned into what a person can act on (or a
        RetryableError when trying again may help)."""
        try:
            return await call(**args)
        except ClientError as e:
            raise await explain(e, address, self._bucket_exists) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise no_credentials() from None
        except BotoCoreError as e:
            raise RetryableError(f"{what} {address}: {e}") from None

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
            raise no_credentials() from None
        except BotoCoreError as e:
            # Renewing the credentials failed: their source (instance metadata, a
            # container endpoint) was down or throttled us, which passes.
            raise RetryableError(f"{info}: renewing the AWS credentials: {e}") from None

    @asynccontextmanager
    async def _get(
        self,
        address: S3Address,
        headers: dict[str, str],
        what: str,
        status: int,
        url: str | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET of a URL presigned now (``url``, or one presigned here), answered with
        ``status``: anything else, or a failed request, raises as blobferry's error. Only
        the request is guarded here: what the caller raises passes as is, and reading
        the body is _chunks' part."""
        if url is None:
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
                    await raise_for(resp, address, what)
            except TimeoutError:
                raise StallError(what, self._settings.retry.stall_timeout_s) from None
            except aiohttp.ClientHttpProxyError as e:
                raise refused_by_proxy(e.status, what) from None
            except aiohttp.ClientError as e:
                raise RetryableError(f"{what}: {connection_failed(e)}") from None
            yield resp

    async def read_range(
        self, info: ObjectInfo, start: int, length: int, into: bytearray | None = None
    ) -> Chunks:
        """Exactly ``length`` bytes from ``start`` of the version ``info`` describes, in
        one buffer: ``into``, when given, of ``length`` bytes."""
        headers = {"Range": f"bytes={start}-{start + length - 1}", "If-Match": info.etag}
        what = f"GET {info.address} bytes {start}-{start + length - 1}"
        url = await self.presign(info.address)
        if self._reads_directly(url):
            buf = bytearray(length) if into is None else into
            assert len(buf) == length
            said = await self._read_into(url, headers, buf, info.address, what, 206)
            _check_range(said.get("Content-Range"), start, length, what)
            return Chunks.of(buf)
        async with self._get(info.address, headers, what, 206, url) as resp:
            _check_range(resp.headers.get("Content-Range"), start, length, what)
            return await self._read_exactly(resp, length, what)

    async def read_object(self, listed: Listed, address: S3Address) -> tuple[ObjectInfo, Chunks]:
        """A whole small object in one GET, its headers standing in for a HEAD."""
        what = f"GET {address}"
        headers = {"If-Match": listed.etag}
        url = await self.presign(address)
        if self._reads_directly(url):
            buf = bytearray(listed.size)  # If-Match: the version listed, of the size listed
            said = await self._read_into(url, headers, buf, address, what, 200)
            return info_from_headers(address.bucket, address.key, said), Chunks.of(buf)
        async with self._get(address, headers, what, 200, url) as resp:
            info = info_from_headers(address.bucket, address.key, resp.headers)
            return info, await self._read_exactly(resp, info.size, what)

    def _reads_directly(self, url: str) -> bool:
        """Whether a GET of ``url`` is read by http1.py (which says why): not through
        an egress proxy, and not paced by the bandwidth cap, where aiohttp reads it."""
        return (
            self._settings.s3.direct_reads
            and self._bodies is not None
            and not self.bandwidth.on
            and not self._proxies.route(url)
        )

    async def _read_into(
        self,
        url: str,
        headers: dict[str, str],
        buf: bytearray,
        address: S3Address,
        what: str,
        status: int,
    ) -> Mapping[str, str]:
        """A GET answered ``status``, its body read into ``buf``; its headers."""
        assert self._bodies is not None
        resp = await self._bodies.get(url, headers, memoryview(buf), what, status)
        if resp.status != status:
            await raise_for(resp, address, what)
        return resp.headers

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


def _check_range(said: str | None, start: int, length: int, what: str) -> None:
    m = CONTENT_RANGE.match(said or "")
    if not m or int(m.group(1)) != start or int(m.group(2)) != start + length - 1:
        raise RetryableError(f"{what}: answered with the wrong range")


async def _clients(settings: Settings, stack: AsyncExitStack) -> tuple[Any, QuerySigner]:
    """botocore's client for control calls (HEAD, LIST), opened on ``stack``, and the
    signer of payload GETs, which makes clients like it for buckets in other regions."""
    s = settings.s3
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
        connect_timeout=settings.retry.connect_timeout_s,
        read_timeout=settings.retry.stall_timeout_s,
        max_pool_connections=16,
    )
    client = await stack.enter_async_context(
        session.create_client("s3", endpoint_url=s.endpoint_url, config=config)
    )
    regional: dict[str, Any] = {}
    creating = asyncio.Lock()

    async def client_in(region: str) -> Any:
        """A client like the first, for buckets that live in ``region``."""
        async with creating:
            if region not in regional:
                regional[region] = await stack.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=s.endpoint_url,
                        config=config.merge(AioConfig(region_name=region)),
                    )
                )
        return regional[region]

    return client, QuerySigner(client, s.presign_expires_s, client_in, s.local_signing)
