"""Payload requests around aiohttp: S3's GETs read straight into a block's buffer, and
Azure's Put Blob and Put Block bodies sent straight from it.

Why, measured: aiohttp copies each byte of a GET's body twice on its way to the caller
(its parser slices every read into a new bytes object, and readany joins what has
piled up), and a fifth of the daemon's CPU on wan-256 went to those copies and to the
allocations behind them (py-spy; 3.44 -> 3.00 CPU s/GiB with one MD5 pass). Here the
kernel writes each read into the block's buffer (asyncio.BufferedProtocol: recv_into),
and Python runs once per read. A 48 KiB Put Blob on Azurite cost the daemon 355 us of
CPU sent by aiohttp and 215 us sent here (the SDK's signing included; the bare
benchmarks/ceiling.py client: 90-110 us): 9.08 -> 8.07 CPU s/GiB on `many`, with the
signing of azure_direct.py.

Only what these requests need: HTTP/1.1 with keep-alive, over TCP or TLS, straight to
the endpoint, a body of known length each way. Through an egress proxy, under S3's
bandwidth cap (which paces each chunk), or for a piped body, aiohttp carries the
request as before. A response it cannot read here (a chunked body where a range was
asked for, say) is an error like any other: retried. tests/test_http1.py holds it to aiohttp's
behaviour on the same requests, on the strict S3 front and on Azurite. Over the
house's 400 lines, and kept whole: one connection's state machine serves both sides.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping
from typing import cast
from urllib.parse import urlsplit

from daemon.chunks import pieces
from daemon.errors import RetryableError, StallError, os_refusal
from daemon.sigv4 import sent_host

_HEAD_MAX = 16 * 1024  # a response's status line and headers; S3's are 1-3 KiB
_ERROR_MAX = 1024 * 1024  # an error's body (XML) is read whole up to this
_IDLE_S = 15.0  # S3 closes an idle keep-alive connection after about 20 s


class Headers(dict[str, str]):
    """A response's headers, names in lower case; ``get`` takes any case."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


class Response:
    """The status and headers of a response; ``body`` its bytes once read."""

    def __init__(self, status: int, headers: Headers, body: bytearray | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def read(self) -> bytes:  # raise_for reads an error's body so
        return bytes(self.body or b"")


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(_HEAD_MAX)
        self._got = 0  # bytes of the head so far
        self._body: memoryview | None = None  # where the body goes, once the head is in
        self._filled = 0
        self._until_eof = False  # an error body with no length: to the close
        self._into_target = False  # the body went to the caller's buffer
        self._chunked: bytearray | None = None  # a small body's chunked encoding, so far
        self.response: Response | None = None
        self._target: memoryview | None = None  # the caller's buffer for the body
        self._expect = 0  # the status whose body goes there
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # while the socket is full
        self.paused = False
        self.progress = 0.0  # the loop's time of the last bytes received, or taken
        self.reusable = False
        self.received = False  # any byte of a response at all
        self.idle_since = 0.0

    # -- the caller's side ------------------------------------------------------------

    def send(self, request: bytes, target: memoryview | None, expect: int) -> asyncio.Future[None]:
        """Send ``request`` (its head); done when the response is in. Its body, when
        the status is ``expect``, lands in ``target``; any other (or every one, with no
        target) comes in the response, up to 1 MiB."""
        assert self.transport is not None
        self._got = self._filled = 0
        self._body = None
        self._until_eof = self._into_target = False
        self._chunked = None
        self.response = None
        self.received = False
        self._target = target
        self._expect = expect
        self.reusable = False
        self._waiter = self._loop.create_future()
        self.progress = self._loop.time()
        self.transport.write(request)
        return self._waiter

    def writable(self) -> asyncio.Future[None]:
        """Done when the socket takes more, or when there is no point sending more (the
        response came, or the connection went)."""
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
            if not self.paused or self._waiter is None or self._waiter.done():
                self._writable.set_result(None)
        return self._writable

    def close(self, flush: bool = True) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()  # its caller has gone: nobody is left to tell
        if self.transport is None:
            return
        if flush:
            self.transport.close()
        else:
            # A body cut short is not sent on: a half-sent request must not be finished
            # from a buffer that is about to hold another block.
            self.transport.abort()

    # -- the protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._until_eof and self._body is not None:
            self._finish()
            return
        why = f"connection closed ({exc})" if exc else "connection closed"
        self._fail(RetryableError(why))
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.progress = self._loop.time()
        self._wake_writer()

    def eof_received(self) -> bool:
        return False  # close

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._chunked is not None:
            return memoryview(self._head)  # a scratch buffer now: the head is parsed
        if self._body is not None:
            return self._body[self._filled :]
        return memoryview(self._head)[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        self.received = True
        self.progress = self._loop.time()
        if self._waiter is None or self._waiter.done():
            self._fail(RetryableError("bytes arrived with no request outstanding"))
            return
        if self._chunked is not None:
            self._chunked += self._head[:nbytes]
            self._dechunk()
            return
        if self._body is not None:
            self._filled += nbytes
            # get_buffer hands out no more than the body's room: full is done (an error's
            # body with no length is kept to its first MiB).
            if self._filled == len(self._body):
                self._finish()
            return
        self._got += nbytes
        end = self._head.find(b"\r\n\r\n", 0, self._got)
        if end < 0:
            if self._got == len(self._head):
                self._fail(RetryableError("the response's headers are too large"))
            return
        try:
            self._start_body(end)
        except RetryableError as e:
            self._fail(e)

    def _start_body(self, end: int) -> None:
        # As aiohttp decodes them: S3 sends metadata as the uploader's UTF-8 bytes.
        lines = bytes(self._head[:end]).decode("utf-8", "surrogateescape").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise RetryableError(f"not an HTTP/1.1 response: {lines[0][:60]!r}")
        headers = Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise RetryableError("a malformed header in the response")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        self.response = Response(status, headers)
        length = headers.get("content-length")
        self.reusable = (
            version == "HTTP/1.1" and (headers.get("connection") or "").lower() != "close"
        )
        target = self._target
        if "chunked" in (headers.get("transfer-encoding") or "").lower():
            if target is not None and status == self._expect:
                raise RetryableError("a chunked response, which this reader does not take")
            # An error's small body, as Azurite sends them.
            self._chunked = bytearray(self._head[end + 4 : self._got])
            self._got = 0
            self._dechunk()
            return
        skip = False
        if target is not None and status == self._expect:
            if length is None or int(length) != len(target):
                raise RetryableError(f"a body of {length} bytes, not the {len(target)} asked for")
            self._body = target
            self._into_target = True
        elif length is not None and int(length) <= _ERROR_MAX:
            self._body = memoryview(bytearray(int(length)))
        elif length is not None:  # a whole object where a range was asked for, say
            self.reusable = False  # its body is not read: the connection goes
            self._body = memoryview(bytearray(0))
            skip = True
        else:  # an error with no length: its body ends with the connection
            self._until_eof = True
            self.reusable = False
            self._body = memoryview(bytearray(_ERROR_MAX))
        extra = self._got - end - 4
        if self._until_eof or skip:
            extra = min(extra, len(self._body))
        elif extra > len(self._body):
            raise RetryableError("the response's body is larger than it said")
        self._body[:extra] = self._head[end + 4 : end + 4 + extra]
        self._filled = extra
        self._got = 0  # the head is used up: what comes next goes to the body
        if self._filled == len(self._body):  # full is done, as in buffer_updated
            self._finish()

    def _dechunk(self) -> None:
        """Finish once the chunked body is all in (trailers are dropped)."""
        raw = self._chunked
        assert raw is not None and self.response is not None
        body = bytearray()
        at = 0
        while True:
            eol = raw.find(b"\r\n", at)
            if eol < 0:
                break
            try:
                size = int(bytes(raw[at:eol]).split(b";")[0], 16)
            except ValueError:
                self._fail(RetryableError("a malformed chunked body in the response"))
                return
            if size == 0:
                if raw[eol + 2 : eol + 4] != b"\r\n" and raw.find(b"\r\n\r\n", eol) < 0:
                    break  # trailers still coming
                self._chunked = None
                self.response.body = body
                self._resolve()
                return
            if len(raw) < eol + 4 + size:
                break
            body += raw[eol + 2 : eol + 2 + size]
            at = eol + 4 + size
        if len(raw) > _ERROR_MAX:
            self._fail(RetryableError("the response's chunked body is too large"))

    def _finish(self) -> None:
        assert self.response is not None and self._body is not None
        if not self._into_target:
            self.response.body = bytearray(self._body[: self._filled])
        self._resolve()

    def _resolve(self) -> None:
        """The response is in: its caller, and a body still being sent, are told."""
        self._body = None
        self._target = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._wake_writer()

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        self._chunked = None
        self._body = None
        self._target = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self._wake_writer()
        if self.transport is not None:
            self.transport.abort()  # nothing more is sent from the caller's buffers

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)


class Connections:
    """Keep-alive connections to the endpoints, and the payload requests sent on them."""

    def __init__(self, connect_timeout_s: float, stall_s: float, max_connections: int) -> None:
        self._connect_s = connect_timeout_s
        self._stall_s = stall_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl: ssl.SSLContext | None = None
        self.made = 0  # connections opened, for the tests

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    async def get(
        self, url: str, headers: Mapping[str, str], into: memoryview, what: str, expect: int = 206
    ) -> Response:
        """GET ``url``; answered ``expect``, its body of exactly ``len(into)`` bytes lands
        in ``into``; another status's body (up to 1 MiB) comes in the response."""
        return await self._request("GET", url, {"Accept": "*/*", **headers}, (), into, expect, what)

    async def put(
        self,
        url: str,
        headers: Mapping[str, str],
        body: Iterable[bytes | bytearray | memoryview],
        what: str,
    ) -> Response:
        """PUT ``body`` (its chunks, sent as they are; ``headers`` give its length) to
        ``url``; the response comes with its body, up to 1 MiB."""
        return await self._request("PUT", url, headers, body, None, 0, what)

    async def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Iterable[bytes | bytearray | memoryview],
        into: memoryview | None,
        expect: int,
        what: str,
    ) -> Response:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # The URL is sent as it stands, and its Host as aiohttp sends it: S3 checks the
        # signature over both as they arrive.
        host_header = sent_host(parts.scheme, parts.netloc)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        key = (parts.scheme, host, port)
        async with self._slots:
            for attempt in (1, 2):
                conn, reused = await self._connection(key, tls, host, port, what)
                try:
                    done = conn.send(request, into, expect)
                    whole = await self._send_body(conn, body, done, what)
                    await self._wait(conn, done, what)
                except StallError:
                    conn.close(flush=False)
                    raise
                except RetryableError as e:
                    conn.close(flush=False)
                    # A kept-alive connection the server closed as it went idle: the
                    # request never reached it, and goes again on a new one at once.
                    if reused and not conn.received and attempt == 1:
                        continue
                    raise RetryableError(f"{what}: {e}") from None
                except BaseException:
                    conn.close(flush=False)  # cancelled mid-way: in no state to reuse
                    raise
                response = conn.response
                assert response is not None
                if conn.reusable and whole:
                    conn.idle_since = asyncio.get_running_loop().time()
                    self._idle.setdefault(key, []).append(conn)
                else:
                    conn.close(flush=False)
                return response
        raise AssertionError("unreachable")

    async def _send_body(
        self,
        conn: _Connection,
        body: Iterable[bytes | bytearray | memoryview],
        done: asyncio.Future[None],
        what: str,
    ) -> bool:
        """``body`` onto the socket as it takes it; False when the response came first
        (an error, say), and the rest was not sent."""
        for piece in pieces(body):
            if done.done():
                return False
            assert conn.transport is not None
            conn.transport.write(piece)
            if conn.paused:
                await self._wait(conn, conn.writable(), what)
        return True

    async def _connection(
        self, key: tuple[str, str, int], tls: bool, host: str, port: int, what: str
    ) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key, [])
        while idle:
            conn = idle.pop()
            fresh = loop.time() - conn.idle_since < _IDLE_S
            if fresh and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
            conn.close()
        context = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if tls else None,
                )
        except TimeoutError:
            raise RetryableError(f"{what}: no connection within {self._connect_s:g} s") from None
        except OSError as e:
            raise RetryableError(f"{what}: {os_refusal(e, e, host, port)}") from None
        self.made += 1
        return protocol, False

    async def _wait(self, conn: _Connection, done: asyncio.Future[None], what: str) -> None:
        """Until the response is in; a StallError after stall_s without a byte."""
        loop = asyncio.get_running_loop()
        while True:
            left = conn.progress + self._stall_s - loop.time()
            if left <= 0:
                raise StallError(what, self._stall_s)
            finished, _ = await asyncio.wait([done], timeout=left)
            if finished:
                done.result()
                return
