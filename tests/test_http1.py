"""The payload requests sent around aiohttp (http1.py): S3's ranged GETs and Azure's
Put Blob and Put Block. The same bytes and the same errors as aiohttp's on the same
requests, on the strict S3 front and on Azurite; and the faults a plain HTTP/1.1
server can commit, from a real socket server here: a kept-alive connection closed
while idle, a stall either way, a chunked or short or long body, an answer before the
body is sent, a cancel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from azure.storage.blob import BlobServiceClient

from daemon.addresses import AzAddress, S3Address
from daemon.azure import AzureWriter
from daemon.blockcheck import BlockCheck, Kind, compute
from daemon.chunks import Chunks
from daemon.errors import PermanentError, RetryableError, SourceChangedError, StallError
from daemon.http1 import Connections
from daemon.objects import Listed, ObjectInfo
from daemon.properties import BlobHeaders
from daemon.s3 import S3Reader
from daemon.seams import ANYTHING
from daemon.settings import Settings
from tests.test_identity import self_signed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A real HTTP/1.1 server on a free port; yields its URL and a count of connections."""
    accepted = [0]

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/bkt/key?X-Amz-Signature=abc", accepted
    finally:
        srv.close()


async def _request(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


def _then_silence(raw: bytes) -> Handler:
    """A server that answers a request with ``raw``, then sends nothing more."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        w.write(raw)
        await w.drain()
        await asyncio.sleep(10)

    return handler


def _answer(body: bytes, status: str = "206 Partial Content", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def _get(url: str, n: int, stall_s: float = 5.0, reader: Connections | None = None) -> Any:
    reader = reader or Connections(2.0, stall_s, 4)
    buf = bytearray(n)
    resp = await reader.get(url, {"Range": f"bytes=0-{n - 1}"}, memoryview(buf), "GET k")
    return resp, bytes(buf)


async def test_a_body_lands_in_the_buffer_and_the_connection_is_kept() -> None:
    body = os.urandom(300_000)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            req = await _request(r)
            assert b"Range: bytes=0-299999\r\n" in req
            assert req.startswith(b"GET /bkt/key?X-Amz-Signature=abc HTTP/1.1\r\nHost: 127.0.0.1:")
            # The body in pieces, the first one with the head: as a socket delivers it.
            w.write(_answer(body)[:1000])
            await w.drain()
            await asyncio.sleep(0.01)
            w.write(_answer(body)[1000:])
            await w.drain()

    async with server(handler) as (url, accepted):
        reader = Connections(2.0, 5.0, 4)
        for _ in range(3):
            resp, got = await _get(url, len(body), reader=reader)
            assert resp.status == 206 and got == body
        reader.close()
    assert accepted[0] == 1


async def test_a_kept_connection_the_server_closed_while_idle_is_replaced_at_once() -> None:
    body = b"x" * 1000

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        w.write(_answer(body))  # no Connection: close, and closes all the same
        await w.drain()

    async with server(handler) as (url, accepted):
        reader = Connections(2.0, 5.0, 4)
        for _ in range(3):
            _, got = await _get(url, len(body), reader=reader)
            assert got == body
            await asyncio.sleep(0.05)  # the close reaches the idle connection
        reader.close()
    assert accepted[0] == 3


async def test_a_request_the_server_drops_unanswered_on_a_kept_connection_goes_again() -> None:
    body = b"y" * 1000
    served = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            await _request(r)
            served += 1
            if served == 2:
                return  # the race S3's idle timeout makes: closed as the request arrives
            w.write(_answer(body))
            await w.drain()

    async with server(handler) as (url, accepted):
        reader = Connections(2.0, 5.0, 4)
        for _ in range(2):
            _, got = await _get(url, len(body), reader=reader)
            assert got == body
        reader.close()
    assert accepted[0] == 2 and served == 3


async def test_a_stalled_body_raises_after_the_stall_timeout_not_before() -> None:
    async with server(_then_silence(_answer(b"z" * 1000)[:500])) as (url, _):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(StallError, match=r"no byte received for 0\.5 s"):
            await _get(url, 1000, stall_s=0.5)
        assert 0.5 <= loop.time() - t0 < 2


async def test_a_slow_body_that_keeps_coming_is_no_stall() -> None:
    body = os.urandom(20_000)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        raw = _answer(body)
        for at in range(0, len(raw), 2000):  # 1.1 s in all, never 0.5 s without a byte
            w.write(raw[at : at + 2000])
            await w.drain()
            await asyncio.sleep(0.1)

    async with server(handler) as (url, _):
        _, got = await _get(url, len(body), stall_s=0.5)
    assert got == body


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 206 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "chunked"),
        (_answer(b"a" * 999), "not the 1000 asked for"),
        (b"HTTP/1.1 206 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 500, "connection closed"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 response"),
        (b"HTTP/1.1 206 OK\r\n" + b"X-Big: " + b"a" * 20_000, "headers are too large"),
    ],
)
async def test_a_response_it_cannot_take_is_a_retryable_error(answer: bytes, error: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        w.write(answer)
        await w.drain()

    async with server(handler) as (url, _):
        with pytest.raises(RetryableError, match=error):
            await _get(url, 1000)


async def test_an_error_answer_comes_back_with_its_body_and_the_connection_is_kept() -> None:
    xml = b"<Error><Code>PreconditionFailed</Code><Message>m</Message></Error>"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        w.write(_answer(xml, "412 Precondition Failed", "Date: x\r\n"))
        await _request(r)
        w.write(_answer(b"ok"))
        await w.drain()

    async with server(handler) as (url, accepted):
        reader = Connections(2.0, 5.0, 4)
        resp, _ = await _get(url, 2, reader=reader)
        assert resp.status == 412 and await resp.read() == xml
        assert resp.headers.get("DATE") == "x"
        _, got = await _get(url, 2, reader=reader)
        assert got == b"ok" and accepted[0] == 1
        reader.close()


async def test_a_cancelled_read_closes_its_connection_and_leaves_nothing_behind() -> None:
    async with server(_then_silence(_answer(b"q" * 1000)[:300])) as (url, _):
        reader = Connections(2.0, 5.0, 4)
        task = asyncio.create_task(_get(url, 1000, reader=reader))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert not any(reader._idle.values())  # nothing half-read goes back to the pool


# -- against aiohttp, on the strict S3 front -------------------------------------------


async def _both(settings: Settings, info: ObjectInfo, start: int, n: int) -> list[Any]:
    """What each reader made of one ranged GET and of one whole GET: the bytes and the
    object's description, or the error's type and text."""
    out: list[Any] = []
    for direct in (True, False):
        s3 = settings.s3.model_copy(update={"direct_reads": direct})
        async with S3Reader(settings.model_copy(update={"s3": s3})) as reader:
            assert reader._bodies is not None
            made = reader._bodies.made
            try:
                ranged = b"".join(await reader.read_range(info, start, n))
                listed = Listed(info.key, info.size, info.etag, None)
                whole, data = await reader.read_object(listed, info.address)
                out.append((ranged, whole, b"".join(data)))
            except Exception as e:
                out.append((type(e), str(e)))
            assert (reader._bodies.made > made) == direct  # each GET read by the one asked

    return out


async def test_a_whole_object_where_a_range_was_asked_for_is_not_read() -> None:
    # 5 MB said, 100 kB sent: the rest would take long, and is never waited for.
    async with server(
        _then_silence(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b"w" * 100_000)
    ) as (url, _):
        reader = Connections(2.0, 5.0, 4)
        resp, _ = await asyncio.wait_for(_get(url, 1000, reader=reader), 2)
        assert resp.status == 200 and await resp.read() == b""
        assert not any(reader._idle.values())  # its connection is not used again


async def test_the_same_bytes_and_the_same_errors_as_aiohttps(
    settings: Settings, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    key = "dir/odd key+ü.bin"
    s3_client.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType="text/x-odd; charset=utf-8",
        ContentDisposition='attachment; filename="a b.txt"',
        Metadata={"Owner": "ops", "run-id": "42"},
    )
    async with S3Reader(settings) as reader:
        info = await reader.head(S3Address(bucket, key))
    direct, through_aiohttp = await _both(settings, info, 1000, len(body) - 1000)
    assert direct == through_aiohttp
    ranged, whole, data = direct
    assert ranged == body[1000:] and data == body
    assert whole.metadata == {"owner": "ops", "run-id": "42"} and whole.etag == info.etag
    # Refusals, each read as aiohttp's reading reads it.
    changed = dataclasses.replace(info, etag='"0123"')
    a, b = await _both(settings, changed, 0, 10)
    assert a == b and a[0] is SourceChangedError
    gone = dataclasses.replace(info, key="missing")
    a, b = await _both(settings, gone, 0, 10)
    assert a == b and a[0] is PermanentError and "NoSuchKey" in a[1]


async def test_over_tls_the_certificate_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _over_tls(tmp_path, monkeypatch)


def test_over_tls_on_uvloop_as_the_daemon_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon runs on uvloop, whose TLS transport feeds a BufferedProtocol its own way.
    uvloop.run(_over_tls(tmp_path, monkeypatch))


async def _over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GETs, then PUTs whose bodies the server reads slowly (so the TLS transport
    pauses the writer and resumes it), all on one kept connection."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    body = os.urandom(200_000)
    upload = [os.urandom(3 * 1024 * 1024 + 1), os.urandom(5 * 1024 * 1024)]
    received: list[bytes] = []

    connections = 0

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                head = await _request(r)
                if head.startswith(b"PUT "):
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    got = bytearray()
                    while len(got) < length:
                        got += await r.read(min(256 * 1024, length - len(got)))
                        await asyncio.sleep(0.002)
                    received.append(bytes(got))
                    w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                else:
                    w.write(_answer(body))
                await w.drain()
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    url = f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}/bkt/key"
    try:
        with pytest.raises(RetryableError, match="CERTIFICATE_VERIFY_FAILED"):
            await _get(url, len(body))  # an authority this host does not trust
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as a systemd unit would set it
        reader = Connections(2.0, 5.0, 4)
        for _ in range(2):
            _, got = await _get(url, len(body), reader=reader)
            assert got == body
        size = str(sum(map(len, upload)))
        for _ in range(2):
            resp = await reader.put(url, {"Content-Length": size}, upload, "put")
            assert resp.status == 201
        assert received == [b"".join(upload)] * 2
        reader.close()
        assert connections == 1  # one kept for all (the refused handshake never got here)
    finally:
        srv.close()


# -- PUTs: Azure's Put Blob and Put Block bodies, sent from their buffers ---------------


async def _read_put(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await _request(r)
    length = int(
        next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    return head, await r.readexactly(length)


async def test_a_put_body_goes_whole_in_its_chunks_and_the_connection_is_kept() -> None:
    chunks = [os.urandom(100), os.urandom(2 * 1024 * 1024 + 7), os.urandom(3000)]
    seen: list[tuple[bytes, bytes]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _read_put(r))
            w.write(b'HTTP/1.1 201 Created\r\nContent-Length: 0\r\nETag: "0x1"\r\n\r\n')
            await w.drain()

    async with server(handler) as (url, accepted):
        conns = Connections(2.0, 5.0, 4)
        length = sum(map(len, chunks))
        for _ in range(2):
            resp = await conns.put(url, {"Content-Length": str(length)}, chunks, "put")
            assert resp.status == 201 and resp.headers.get("ETag") == '"0x1"'
            assert resp.body == b""
        conns.close()
    assert accepted[0] == 1
    for head, body in seen:
        assert head.startswith(b"PUT /bkt/key?X-Amz-Signature=abc HTTP/1.1\r\nHost: 127.0.0.1:")
        assert body == b"".join(chunks)


async def test_an_answer_before_the_whole_body_ends_the_put_and_its_connection() -> None:
    """Azure may refuse a request from its head (a bad signature, say) without reading
    the body: the refusal comes back as an answer, its chunked XML decoded, and the
    connection, whose request was cut short, is not used again."""
    xml = b"<?xml version='1.0'?><Error><Code>AuthorizationFailure</Code></Error>"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        w.write(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n"
            b"x-ms-error-code: AuthorizationFailure\r\n\r\n"
            + f"{20:x}\r\n".encode()
            + xml[:20]
            + b"\r\n"
            + f"{len(xml) - 20:x};ext=1\r\n".encode()
            + xml[20:]
            + b"\r\n0\r\n\r\n"
        )
        await w.drain()
        await asyncio.sleep(10)  # the body is never read

    async with server(handler) as (url, accepted):
        conns = Connections(2.0, 5.0, 4)
        body = [bytearray(16 * 1024 * 1024)]  # more than the sockets hold
        for n in (1, 2):
            resp = await asyncio.wait_for(
                conns.put(url, {"Content-Length": str(len(body[0]))}, body, "put"), 5
            )
            assert resp.status == 403 and resp.body == xml
            assert resp.headers.get("X-MS-Error-Code") == "AuthorizationFailure"
            assert accepted[0] == n and not any(conns._idle.values())


async def test_a_put_whose_body_the_peer_stops_reading_stalls() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r)
        await r.readexactly(100_000)
        await asyncio.sleep(10)  # and no more

    async with server(handler) as (url, _):
        conns = Connections(2.0, 0.5, 4)
        body = [bytearray(32 * 1024 * 1024)]
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(StallError, match=r"no byte received for 0\.5 s"):
            await conns.put(url, {"Content-Length": str(len(body[0]))}, body, "put")
        assert 0.5 <= asyncio.get_running_loop().time() - t0 < 3
        assert not any(conns._idle.values())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
    ids=["malformed", "cut-short"],
)
async def test_a_chunked_answer_it_cannot_read_is_a_retryable_error(answer: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_put(r)
        w.write(answer)
        await w.drain()

    async with server(handler) as (url, _):
        with pytest.raises(RetryableError, match=r"malformed chunked|connection closed"):
            await Connections(2.0, 5.0, 4).put(url, {"Content-Length": "3"}, [b"abc"], "put")


async def test_the_same_blobs_and_the_same_errors_as_aiohttps(
    settings: Settings, blob_service: BlobServiceClient, container: str
) -> None:
    """Put Blob and Put Block sent from their buffers (azure.direct_writes) and by
    aiohttp, on Azurite: the same blobs, properties and refusals."""
    name = "dir/odd name+ü 50% #1 ~x=y&z;'(1)!*@$,.bin"
    data = os.urandom(3 * 1024 * 1024 + 5)
    blocks = [data[: 2 * 1024 * 1024], data[2 * 1024 * 1024 :]]
    headers = BlobHeaders(content_type="text/x-odd", cache_control="no-cache")

    async def run(writes: bool) -> list[Any]:
        s = settings.model_copy(
            update={"azure": settings.azure.model_copy(update={"direct_writes": writes})}
        )
        out: list[Any] = []
        async with AzureWriter(s) as w:
            dst = AzAddress(container, f"{writes}/{name}")
            await w.put(
                dst,
                Chunks.of(bytearray(data)),
                compute(Kind.MD5, Chunks.of(bytearray(data))),
                headers,
                {"owner": "ops"},
                ANYTHING,
            )
            big = AzAddress(container, f"{writes}/blocks/{name}")
            ids = []
            for n, block in enumerate(blocks):
                ids.append(f"{n:04d}")
                chunks = Chunks.of(bytearray(block))
                await w.stage(big, ids[-1], chunks, compute(Kind.CRC64, chunks))
            await w.commit(big, ids, None, headers, {}, ANYTHING)
            for bad in (
                lambda: w.put(
                    AzAddress("no-such-ctr", "b"),
                    Chunks.of(bytearray(b"x")),
                    compute(Kind.MD5, Chunks.of(bytearray(b"x"))),
                    headers,
                    {},
                    ANYTHING,
                ),
                lambda: w.put(
                    dst,
                    Chunks.of(bytearray(b"x")),
                    BlockCheck(Kind.MD5, b"\0" * 16),
                    headers,
                    {},
                    ANYTHING,
                ),
                lambda: w.stage(
                    big,
                    "0009",
                    Chunks.of(bytearray(b"xy")),
                    compute(Kind.MD5, Chunks.of(bytearray(b"yx"))),
                ),
            ):
                with pytest.raises(Exception) as e:
                    await bad()
                out.append((type(e.value), str(e.value).replace(f"{writes}/", "")))
        return out

    assert await run(True) == await run(False)
    for writes in (True, False):
        for blob in (f"{writes}/{name}", f"{writes}/blocks/{name}"):
            props = blob_service.get_blob_client(container, blob).get_blob_properties()
            assert props.content_settings.content_type == "text/x-odd"
            assert props.content_settings.cache_control == "no-cache"
        got = blob_service.get_blob_client(container, f"{writes}/{name}")
        assert got.download_blob().readall() == data
        assert got.get_blob_properties().metadata == {"owner": "ops"}
        big = blob_service.get_blob_client(container, f"{writes}/blocks/{name}")
        assert big.download_blob().readall() == data
