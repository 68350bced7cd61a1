"""An S3 front that checks SigV4 signatures the way Amazon S3 does, before moto.

moto and s3rver decode and normalise a request's path before they look at it, so a client
that signs one spelling of a key and sends another (``year%3D2024`` signed, ``year=2024``
sent, or ``a/./b`` resolved to ``a/b`` on the way) passes them and fails on S3 with 403
SignatureDoesNotMatch. This front checks what arrives on the wire, as S3 documents it:

- the canonical URI is the path exactly as received: "you do not normalize URI paths for
  requests to Amazon S3" and it is URI-encoded once, by the client (S3 API reference,
  "Signature Calculations for the Authorization Header", Task 1: Create a Canonical
  Request; and botocore's S3SigV4Auth, whose ``_normalize_url_path`` returns the path
  as is);
- the canonical query is every parameter but X-Amz-Signature, each name and value
  URI-encoded (A-Z a-z 0-9 - _ . ~ left as they are), sorted by name then value;
- the canonical headers are the signed ones as received (Host included, with or without
  its port as the client sent it), names lower-cased, values trimmed and inner runs of
  spaces folded; the payload hash is x-amz-content-sha256's value (header signatures)
  or UNSIGNED-PAYLOAD (query signatures, "Authenticating Requests: Using Query
  Parameters");
- a presigned request past X-Amz-Date + X-Amz-Expires is refused as expired, and a
  header-signed one more than 15 minutes off the clock as RequestTimeTooSkewed.

A request that passes is forwarded byte for byte to moto; one that fails is answered as
S3 answers it: 403 with SignatureDoesNotMatch and the canonical request S3 computed (a
HEAD's answer has no body). Requests signed with an access key this front was not given
(moto's STS hands out its own) are forwarded unchecked and counted apart, so a test can
tell that the ones it cares about were checked. Not checked: the payload's hash against
the body (blobferry sends no body to S3) and the region of the bucket (moto redirects).

Each request goes upstream on a connection of its own, answered with Connection: close,
so the check sees every request line a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote, urlsplit

from tests.proxy import LoopbackServer

_HEAD_LIMIT = 64 * 1024


@dataclass
class Request:
    method: str
    target: str  # the request line's target, byte for byte (decoded as latin-1)
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k.lower() == name]
        return ",".join(found) if found else None


@dataclass
class Refusal:
    status: int
    code: str
    message: str
    canonical: str = ""

    def answer(self, method: str) -> bytes:
        body = b""
        if method != "HEAD":
            body = (
                "<?xml version='1.0' encoding='UTF-8'?>\n<Error>"
                f"<Code>{self.code}</Code><Message>{self.message}</Message>"
                f"<CanonicalRequest>{_xml(self.canonical)}</CanonicalRequest></Error>"
            ).encode()
        head = (
            f"HTTP/1.1 {self.status} Refused\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: STRICT\r\n"
            f"Date: {datetime.now(UTC).strftime('%a, %d %b %Y %H:%M:%S GMT')}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _uri_encode(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_query(raw_query: str, drop: str | None = None) -> str:
    pairs = []
    for item in raw_query.split("&") if raw_query else []:
        name, _, value = item.partition("=")
        name, value = unquote(name), unquote(value)
        if name != drop:
            pairs.append((_uri_encode(name), _uri_encode(value)))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _fold(value: str) -> str:
    return " ".join(value.strip().split())


def check(request: Request, secrets: dict[str, str], now: datetime) -> Refusal | str | None:
    """None when the signature holds; a Refusal as S3 would answer; or the access key
    (a str) when it is one this front has no secret for."""
    path, _, raw_query = request.target.partition("?")
    query = {unquote(k): unquote(v) for k, _, v in (p.partition("=") for p in raw_query.split("&"))}
    if "X-Amz-Signature" in query:
        credential = query.get("X-Amz-Credential", "")
        signed = query.get("X-Amz-SignedHeaders", "")
        amz_date = query.get("X-Amz-Date", "")
        given = query["X-Amz-Signature"]
        payload = query.get("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
        cquery = canonical_query(raw_query, drop="X-Amz-Signature")
    else:
        auth = request.header("authorization")
        if auth is None:
            return Refusal(403, "AccessDenied", "Anonymous requests are not allowed here")
        algorithm, _, rest = auth.partition(" ")
        if algorithm != "AWS4-HMAC-SHA256":
            return Refusal(400, "InvalidArgument", f"unsupported algorithm {algorithm}")
        fields = dict(p.strip().partition("=")[::2] for p in rest.split(","))
        credential = fields.get("Credential", "")
        signed = fields.get("SignedHeaders", "")
        given = fields.get("Signature", "")
        amz_date = request.header("x-amz-date") or ""
        payload = request.header("x-amz-content-sha256") or ""
        if not payload:
            return Refusal(400, "InvalidRequest", "Missing required header: x-amz-content-sha256")
        cquery = canonical_query(raw_query)
    access_key, _, scope = credential.partition("/")
    if access_key not in secrets:
        return access_key
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return Refusal(403, "AccessDenied", f"X-Amz-Date {amz_date!r} is not a date")
    if "X-Amz-Signature" in query:
        if now > when + timedelta(seconds=int(query.get("X-Amz-Expires", "0"))):
            return Refusal(403, "AccessDenied", "Request has expired")
    elif abs(now - when) > timedelta(minutes=15):
        return Refusal(
            403,
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )
    names = signed.split(";")
    if "host" not in names:
        return Refusal(403, "AccessDenied", "host must be a signed header")
    lines = []
    for name in names:
        value = request.header(name)
        if value is None:
            return Refusal(403, "AccessDenied", f"signed header {name} is missing")
        lines.append(f"{name}:{_fold(value)}")
    canonical = "\n".join([request.method, path, cquery, *lines, "", signed, payload])
    day, region, service, _ = ([*scope.split("/"), "", "", "", ""])[:4]
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secrets[access_key]}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    wanted = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(wanted, given):
        return Refusal(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you "
            "provided. Check your key and signing method.",
            canonical,
        )
    return None


@dataclass
class Tally:
    checked: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # method, target, code
    unchecked: int = 0  # signed with a key this front has no secret for


class StrictS3(LoopbackServer):
    """``async with StrictS3(moto_endpoint, {key: secret}) as s3: s3.endpoint``."""

    def __init__(
        self, upstream: str, secrets: dict[str, str], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__()
        self._bind = (host, port)
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.secrets = secrets
        self.tally = Tally()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> StrictS3:
        self._server = await asyncio.start_server(self._serve, *self._bind)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = ([*request_line.split(" ", 2), "", ""])[:3]
        headers = [
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in header_lines if line)
        ]
        request = Request(method, target, headers)
        verdict = check(request, self.secrets, datetime.now(UTC))
        if isinstance(verdict, Refusal):
            self.tally.refused.append((method, target, verdict.code))
            with contextlib.suppress(ConnectionError):
                writer.write(verdict.answer(method))
                await writer.drain()
            writer.close()
            return
        if isinstance(verdict, str):
            self.tally.unchecked += 1
        else:
            self.tally.checked += 1
        await self._forward(request, head, reader, writer)

    async def _forward(
        self,
        request: Request,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        kept = [
            f"{k}: {v}" for k, v in request.headers if k.lower() not in ("connection", "keep-alive")
        ]
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        up_head = "\r\n".join([line, *kept, "Connection: close", "", ""]).encode("latin-1")
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        up_writer.write(up_head)

        async def upload() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(256 * 1024):
                    up_writer.write(chunk)
                    await up_writer.drain()

        sending = asyncio.ensure_future(upload())
        try:
            answer = await up_reader.readuntil(b"\r\n\r\n")
            while answer.startswith(b"HTTP/1.1 100"):  # to Expect: 100-continue
                writer.write(answer)
                answer = await up_reader.readuntil(b"\r\n\r\n")
            status, *lines = answer.decode("latin-1").split("\r\n")
            lines = [
                x for x in lines if x and not x.lower().startswith(("connection:", "keep-alive:"))
            ]
            writer.write(
                "\r\n".join([status, *lines, "Connection: close", "", ""]).encode("latin-1")
            )
            while chunk := await up_reader.read(256 * 1024):
                writer.write(chunk)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            up_writer.close()
            writer.close()


@contextlib.contextmanager
def strict_s3_in_thread(upstream: str, secrets: dict[str, str]) -> Iterator[StrictS3]:
    """A StrictS3 on a loop of its own, for a whole session: tests that block their own
    loop (boto3, subprocess.run) still get answers."""
    ready = threading.Event()
    holder: list[tuple[StrictS3, asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        stop = asyncio.Event()
        async with StrictS3(upstream, secrets) as front:
            holder.append((front, asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the strict S3 front did not start")
    front, loop, stop = holder[0]
    try:
        yield front
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
