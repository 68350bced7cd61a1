"""The emulators' ceiling for many small objects: the least work any copier can ask of
them, asked by the cheapest client this machine can run.

One LIST, then per object one GET (a new TCP connection each: moto's werkzeug closes
every connection) and one Put Blob (on kept-alive connections), 32 at a time, largest
first. Raw HTTP/1.1 over asyncio streams, no SDK: the only client work is framing, a
Shared Key HMAC per Put Blob and reading the bytes. Azure checks each object's bytes
against its ETag (sent as Content-MD5), as blobferry's whole route does. No retries, no
state, no report: it is not a tool anyone should use, it is the bound the benchmark's
object rates are measured against.

    python -m benchmarks.ceiling BUCKET PREFIX CONTAINER DEST_PREFIX [--only s3|azure]
    (env: NAIVE_S3_ENDPOINT, AZURE_STORAGE_CONNECTION_STRING)

``--only`` asks one side alone, to show what bounds the other rows: ``s3`` lists and
GETs every object and writes nothing; ``azure`` lists (one request), then Put Blobs
bytes of each object's size made here, reading nothing. Any copy asks each emulator
for at least that much, with the other one working on the same cores, so no copier's
objects/s can beat either half's.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import html
import os
import re
import sys
from datetime import UTC, datetime
from email.utils import formatdate
from urllib.parse import quote, urlsplit

from daemon.sigv4 import UrlShape, presign_get, sent_host, signing_key

WORKERS = 32
_ENTRY = re.compile(rb"<Key>([^<]*)</Key>.*?<ETag>([^<]*)</ETag>.*?<Size>(\d+)</Size>", re.S)
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server keeps the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    m = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return status, body, b"connection: close" not in lower


async def _once(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status, body, _ = await _response(reader)
        return status, body
    finally:
        writer.close()


def presign(shape: UrlShape, key: str) -> str:
    """A presigned GET, signed as blobferry signs each one (moto refuses unsigned GETs)."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    url = presign_get(
        shape,
        key,
        os.environ["AWS_ACCESS_KEY_ID"],
        None,
        3600,
        datetime.now(UTC),
        lambda day: signing_key(secret, day, shape.region, shape.service),
    )
    return url.split(sent_host(shape.scheme, shape.host), 1)[1]  # the target, as signed


@functools.cache
def made(size: int) -> tuple[bytes, bytes]:
    """Bytes of a given size and their MD5, made once per size: Azure's half alone."""
    body = os.urandom(size)
    return body, hashlib.md5(body).digest()


class Azure:
    def __init__(self, connection_string: str) -> None:
        parts = dict(p.split("=", 1) for p in connection_string.split(";") if p)
        url = urlsplit(parts["BlobEndpoint"])
        self.account = parts["AccountName"]
        self.key = base64.b64decode(parts["AccountKey"])
        self.host, self.port = url.hostname or "", url.port or 80
        self.base = url.path.rstrip("/")  # /devstoreaccount1 on Azurite
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def put(self, container: str, blob: str, body: bytes, md5: bytes) -> None:
        path = f"{self.base}/{container}/{quote(blob, safe='/~')}"
        md5_b64 = base64.b64encode(md5).decode()
        ms = f"x-ms-blob-type:BlockBlob\nx-ms-date:{formatdate(usegmt=True)}\nx-ms-version:2021-08-06\n"
        to_sign = f"PUT\n\n\n{len(body)}\n{md5_b64}\n\n\n\n\n\n\n\n{ms}/{self.account}{path}"
        sig = base64.b64encode(hmac.digest(self.key, to_sign.encode(), "sha256")).decode()
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Length: {len(body)}\r\nContent-MD5: {md5_b64}\r\n"
            + "".join(f"{line.replace(':', ': ', 1)}\r\n" for line in ms.splitlines())
            + f"Authorization: SharedKey {self.account}:{sig}\r\n\r\n"
        )
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        conn[1].write(head.encode())
        conn[1].write(body)
        status, reply, keep = await _response(conn[0])
        if status != 201:
            raise RuntimeError(f"Put Blob {blob}: {status} {reply[:300]!r}")
        if keep:
            self.idle.append(conn)
        else:
            conn[1].close()


async def main(bucket: str, prefix: str, container: str, dest: str, only: str = "") -> None:
    s3 = urlsplit(os.environ["NAIVE_S3_ENDPOINT"])
    s3host, s3port = s3.hostname or "", s3.port or 80
    azure = Azure(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    shape = UrlShape(s3.scheme, s3.netloc, f"/{bucket}/", "", "us-east-1", "s3")  # path style
    objects: list[tuple[int, str, bytes]] = []
    token = b""
    while True:
        query = f"list-type=2&prefix={quote(prefix, safe='')}"
        if token:
            query += f"&continuation-token={quote(token.decode(), safe='')}"
        status, body = await _once(
            s3host, s3port, f"GET /{bucket}?{query} HTTP/1.1\r\nHost: {s3.netloc}\r\n\r\n".encode()
        )
        if status != 200:
            raise RuntimeError(f"LIST: {status} {body[:300]!r}")
        for key, etag, size in _ENTRY.findall(body):
            md5 = bytes.fromhex(html.unescape(etag.decode()).strip('"'))
            objects.append((int(size), html.unescape(key.decode()), md5))
        found = _TOKEN.search(body)
        if not found:
            break
        token = found.group(1)
    objects.sort(reverse=True)  # largest first
    queue = iter(objects)

    async def worker() -> None:
        for size, key, md5 in queue:
            if only == "azure":
                body, md5 = made(size)
            else:
                target = presign(shape, key)
                request = (
                    f"GET {target} HTTP/1.1\r\nHost: {sent_host(s3.scheme, s3.netloc)}\r\n\r\n"
                )
                status, body = await _once(s3host, s3port, request.encode())
                if status != 200 or len(body) != size:
                    raise RuntimeError(f"GET {key}: {status}, {len(body)} of {size} bytes")
            if only != "s3":
                await azure.put(container, dest + key[len(prefix) :], body, md5)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    for _, writer in azure.idle:
        writer.close()


if __name__ == "__main__":
    import uvloop  # as blobferry runs

    only = sys.argv[6] if sys.argv[5:6] == ["--only"] else ""
    uvloop.run(main(*sys.argv[1:5], only=only))
