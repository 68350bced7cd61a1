"""A forward HTTP proxy, as the egress proxy of a private subnet: plain-HTTP requests
in absolute form (``GET http://host:port/path``) and CONNECT tunnels, one request per
connection, optionally behind a login (407 without it). It records the target of
every request, so a test can tell which ones went through it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re

from tests.proxy import LoopbackServer


class HttpProxy(LoopbackServer):
    def __init__(self, login: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.login = login
        self.seen: list[str] = []  # "METHOD host:port/path" of every request forwarded
        self.refused = 0  # requests without the right Proxy-Authorization

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head[:-4].decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
            headers = [f for f in fields if not f.lower().startswith(("proxy-", "connection:"))]
            if self.login is not None and not self._allowed(fields):
                self.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
                writer.write(b'Proxy-Authenticate: Basic realm="test"\r\n')
                writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                path = ""
            else:
                m = re.fullmatch(r"http://([^/:]+)(?::(\d+))?(/.*)?", target)
                assert m, f"not an absolute-form request: {line}"
                host, port, path = m.group(1), m.group(2) or "80", m.group(3) or "/"
            self.seen.append(f"{method} {host}:{port}{path}")
            up_reader, upstream = await asyncio.open_connection(host, int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                rewritten = [f"{method} {path} {version}", *headers, "Connection: close", "", ""]
                upstream.write("\r\n".join(rewritten).encode("latin-1"))
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    def _allowed(self, fields: list[str]) -> bool:
        assert self.login is not None
        want = base64.b64encode(":".join(self.login).encode()).decode()
        return f"proxy-authorization: basic {want}".lower() in (f.lower() for f in fields)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await src.read(64 * 1024):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
