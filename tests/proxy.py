"""A small TCP proxy that injects real faults between blobferry and an emulator.

It forwards bytes both ways and, on the way back (server to client), can: cap each
connection's rate, delay, stall after N bytes, reset a connection after N bytes, and
flip one byte, or lose the answer to one request; on the way up it can stop reading one
connection's request body. Faults pick their victims by connection number, so "every third
connection" is exact. It counts what it forwards, so a test can measure how many
bytes blobferry really read from S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from typing import Self


@dataclass
class Faults:
    rate_bps: float | None = None  # per connection, server to client
    delay_s: float = 0.0  # before each chunk goes back
    reset_every: int = 0  # reset every Nth connection ...
    reset_after: int = 0  # ... after this many bytes back
    stall_every: int = 0  # stall every Nth connection ...
    stall_after: int = 0  # ... after this many bytes back
    flip_at: int | None = None  # flip the byte at this offset of one response stream
    flip_period: int | None = None  # flip a byte at every multiple of this, in every stream
    # Flip the byte at this offset of the first request stream (client to server) that
    # gets that far: bytes damaged on their way to the server.
    upload_flip_at: int | None = None
    # Stop reading what the client sends on this connection (1 = the first) after this
    # many bytes: an upload that stalls, which no read timeout on the client can see.
    # -1: on the first connection whose upload gets that far, whichever it is.
    upload_stall_at: int = 0
    upload_stall_after: int = 0
    # Answer every Nth request (matching error_match) with this status and body instead of
    # forwarding it: S3's SlowDown, Azure's ServerBusy, a permanent 403 ...
    error_every: int = 0
    error_first: int = 0  # or the first N such requests: an outage that passes
    error_status: int = 503
    error_body: bytes = b""
    error_headers: str = ""
    error_match: bytes = b""
    # Refuse presigned requests past X-Amz-Date + X-Amz-Expires, as S3 does (moto does not).
    enforce_expiry: bool = False
    # Access key ID -> when its temporary credentials expire (epoch s): a request signed
    # with them later is refused with ExpiredToken, as S3 does (moto does not).
    credential_expiry: dict[str, float] | None = None
    # The server's clock is this far ahead of ours (negative: behind): a request signed
    # more than 15 minutes off it (or a presigned one past its expiry by it) is refused
    # as S3 or Azure refuses it, with the server's Date. Only requests holding
    # clock_match are judged.
    clock_offset_s: float = 0.0
    clock_match: bytes = b""
    # Lose the answer to the first request that holds this: the server has done the work
    # (a Put Blob committed, say) and the client sees its connection reset.
    lose_reply_match: bytes = b""
    # The answers to the first N requests come this late, the later ones at once: a
    # moment when the server (or this machine) was busy.
    late_first: int = 0
    late_s: float = 0.0


def azure_answers(match: bytes, status: int, code: str) -> Faults:
    """Every request holding ``match`` answered as Azure refuses one: ``status``, with
    its error code in x-ms-error-code (where a HEAD's answer, which has no body, has it)."""
    return Faults(
        error_every=1,
        error_match=match,
        error_status=status,
        error_headers=f"x-ms-error-code: {code}\r\n",
    )


class LoopbackServer:
    """A TCP server on a free loopback port; the tasks serving its connections end
    with it. Subclasses serve a connection in ``_accept``."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._accept(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class FaultProxy(LoopbackServer):
    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        super().__init__()
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.faults = faults or Faults()
        self.connections = 0
        self.open = 0  # connections accepted and not yet torn down
        self.bytes_down = 0  # server to client, all connections
        self.resets = 0
        self.stalls = 0
        self.upload_stalls = 0
        self.flips = 0
        self.expired = 0
        self.requests: list[str] = []  # "METHOD /path" of every request seen
        self.lost_replies = 0
        self._losing: set[int] = set()  # connections whose next answer is to be lost
        self._late: set[int] = set()  # connections whose next answer is to be late
        self.errors = 0
        self._matching = 0
        self._client_writer: dict[int, asyncio.StreamWriter] = {}

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        number = self.connections
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self.open -= 1
            return
        try:
            self._client_writer[id(reader)] = writer
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(reader, up_writer, number, down=False))
                tg.create_task(self._pump(up_reader, writer, number, down=True))
        except* (ConnectionError, OSError, _Reset):
            pass
        finally:
            self._client_writer.pop(id(reader), None)
            for w in (writer, up_writer):
                w.close()
            self.open -= 1

    async def _refuse(self, src: asyncio.StreamReader, chunk: bytes) -> None:
        """Swallow the request (and its body), answer with the configured error."""
        f = self.faults
        await _drain_body(src, chunk)
        reply = (
            f"HTTP/1.1 {f.error_status} Injected\r\nContent-Type: application/xml\r\n"
            f"{f.error_headers}Content-Length: {len(f.error_body)}\r\nConnection: close\r\n\r\n"
        ).encode() + f.error_body
        back = self._client_writer.get(id(src))
        if back is not None:
            back.write(reply)
            await back.drain()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, number: int, down: bool
    ) -> None:
        f = self.faults
        sent = 0
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        flipped = False
        while True:
            chunk = await src.read(64 * 1024)
            if not chunk:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            if not down and (m := _REQUEST.match(chunk)):
                self.requests.append(f"{m.group(1).decode()} {m.group(2).decode()}")
                lose = f.lose_reply_match and f.lose_reply_match in chunk
                if lose and not self.lost_replies and not self._losing:
                    self._losing.add(number)
                if len(self.requests) <= f.late_first:
                    self._late.add(number)
            erring = f.error_every or f.error_first
            if not down and erring and _REQUEST.match(chunk) and f.error_match in chunk:
                self._matching += 1
                if self._matching <= f.error_first or (
                    f.error_every and self._matching % f.error_every == 0
                ):
                    self.errors += 1
                    await self._refuse(src, chunk)
                    raise _Reset()
            status, body, extra = b"403 Forbidden", b"", b""
            judged = not down and f.clock_offset_s and f.clock_match in chunk
            refusal = _off_clock(chunk, f.clock_offset_s) if judged else None
            if refusal is not None:
                body, extra = refusal
            elif not down and f.enforce_expiry and _expired(chunk):
                body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            elif not down and f.credential_expiry and _stale(chunk, f.credential_expiry):
                status, body = (
                    b"400 Bad Request",
                    b"<Error><Code>ExpiredToken</Code>"
                    b"<Message>The provided token has expired.</Message></Error>",
                )
            if body:
                self.expired += 1
                head_only = chunk.startswith(b"HEAD ")  # a HEAD's answer has no body
                reply = (
                    b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\n" % status
                    + extra
                    + b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                    % (0 if head_only else len(body))
                    + (b"" if head_only else body)
                )
                back = self._client_writer.get(id(src))
                if back is not None:
                    back.write(reply)
                    await back.drain()
                raise _Reset()
            if not down:
                chosen = number == f.upload_stall_at or (
                    f.upload_stall_at == -1 and self.upload_stalls == 0
                )
                if chosen and sent + len(chunk) > f.upload_stall_after:
                    self.upload_stalls += 1
                    await asyncio.sleep(3600)  # never read again: the client's send blocks
                at = f.upload_flip_at
                if at is not None and self.flips == 0 and sent <= at < sent + len(chunk):
                    flipped_up = bytearray(chunk)
                    flipped_up[at - sent] ^= 0x01
                    chunk = bytes(flipped_up)
                    self.flips += 1
                sent += len(chunk)
            if down:  # server to client: most faults live here
                if number in self._losing:  # the server answered: it did the work
                    self._losing.discard(number)
                    self.lost_replies += 1
                    _abort(dst)
                    raise _Reset()
                if f.delay_s:
                    await asyncio.sleep(f.delay_s)
                if number in self._late:
                    self._late.discard(number)
                    await asyncio.sleep(f.late_s)
                if (
                    f.reset_every
                    and number % f.reset_every == 0
                    and sent + len(chunk) > f.reset_after
                ):
                    self.resets += 1
                    _abort(dst)
                    raise _Reset()
                if (
                    f.stall_every
                    and number % f.stall_every == 0
                    and sent + len(chunk) > f.stall_after
                ):
                    self.stalls += 1
                    await asyncio.sleep(3600)  # never again a byte; the client must give up
                if (
                    f.flip_at is not None
                    and not flipped
                    and self.flips == 0
                    and sent <= f.flip_at < sent + len(chunk)
                ):
                    b = bytearray(chunk)
                    b[f.flip_at - sent] ^= 0x01
                    chunk = bytes(b)
                    flipped = True
                    self.flips += 1
                if f.flip_period:
                    first = -(-max(sent, 1) // f.flip_period) * f.flip_period
                    if first < sent + len(chunk):
                        b = bytearray(chunk)
                        for at in range(first, sent + len(chunk), f.flip_period):
                            b[at - sent] ^= 0x01
                            self.flips += 1
                        chunk = bytes(b)
                sent += len(chunk)
                self.bytes_down += len(chunk)
                if f.rate_bps:
                    ahead = sent / f.rate_bps - (loop.time() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            dst.write(chunk)
            await dst.drain()


_REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1")
_DATE = re.compile(rb"X-Amz-Date=(\d{8}T\d{6}Z)")
_EXPIRES = re.compile(rb"X-Amz-Expires=(\d+)")


def _presigned(request: bytes) -> tuple[float, int] | None:
    """A presigned request's signing time and lifetime (s), from its request line."""
    line = request.split(b"\r\n", 1)[0]
    date, expires = _DATE.search(line), _EXPIRES.search(line)
    if not date or not expires:
        return None
    return _amz_time(date.group(1)), int(expires.group(1))


def _expired(request: bytes) -> bool:
    signed = _presigned(request)
    return signed is not None and datetime.now(UTC).timestamp() > signed[0] + signed[1]


_HEADER_DATE = re.compile(rb"(?im)^(x-amz-date|x-ms-date):\s*([^\r\n]+)")


def _off_clock(request: bytes, offset: float) -> tuple[bytes, bytes] | None:
    """(body, extra headers) of the refusal a server ``offset`` seconds ahead of this
    machine gives ``request``, or None when it takes it."""
    if not _REQUEST.match(request):
        return None
    server = datetime.now(UTC).timestamp() + offset
    head = request.split(b"\r\n\r\n", 1)[0]
    date = b"Date: " + formatdate(server, usegmt=True).encode() + b"\r\n"
    presigned = _presigned(request)
    if presigned:  # refused once expired, or signed in its future
        signed, expires = presigned
        if server > signed + expires:
            return (
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                date,
            )
        if signed > server + 900:
            return (
                b"<Error><Code>AccessDenied</Code><Message>Request is not valid yet</Message></Error>",
                date,
            )
        return None
    m = _HEADER_DATE.search(head)
    if m is None:
        return None
    value = m.group(2).strip()
    azure = m.group(1).lower() == b"x-ms-date"
    signed = parsedate_to_datetime(value.decode()).timestamp() if azure else _amz_time(value)
    if abs(signed - server) <= 900:
        return None
    if azure:
        return (
            b"<Error><Code>AuthenticationFailed</Code><AuthenticationErrorDetail>Request date "
            b"header too old</AuthenticationErrorDetail></Error>",
            date + b"x-ms-error-code: AuthenticationFailed\r\n",
        )
    return b"<Error><Code>RequestTimeTooSkewed</Code></Error>", date


def _amz_time(value: bytes) -> float:
    return datetime.strptime(value.decode(), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


_KEY_ID = re.compile(rb"Credential=([^/%\s,]+)(?:/|%2F)")


def _stale(request: bytes, expiry: dict[str, float]) -> bool:
    if not _REQUEST.match(request):
        return False
    head = request.split(b"\r\n\r\n", 1)[0]
    key = _KEY_ID.search(head)
    ends = expiry.get(key.group(1).decode()) if key else None
    return ends is not None and datetime.now(UTC).timestamp() > ends


async def _drain_body(src: asyncio.StreamReader, first: bytes) -> None:
    head, sep, rest = first.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    remaining = (int(m.group(1)) if m else 0) - len(rest)
    while sep and remaining > 0:
        chunk = await src.read(min(remaining, 1 << 20))
        if not chunk:
            return
        remaining -= len(chunk)


class _Reset(Exception):
    pass


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a dropped connection looks from the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
