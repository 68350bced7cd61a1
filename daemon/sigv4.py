"""SigV4 query presigning of an object GET, in the standard library alone.

The daemon signs every payload GET with it (``s3.QuerySigner``, once botocore has
resolved the bucket's URL shape); the benchmark's ceiling client signs with it too,
without importing botocore.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote


@dataclass(frozen=True, slots=True)
class UrlShape:
    """Where a bucket's objects are, as a presigned URL spells them."""

    scheme: str
    host: str
    before: str  # the URL path up to the key
    after: str
    region: str
    service: str


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def sent_host(scheme: str, netloc: str) -> str:
    """The Host header an HTTP client sends for ``netloc``: a default port spelled out
    in the endpoint (``https://host:443``) is left off, by aiohttp as by botocore, and
    S3 checks the signature over the header as it arrives."""
    return netloc.removesuffix(_DEFAULT_PORTS.get(scheme, "\0"))


def signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    """The day's key, derived from the secret (AWS4-HMAC-SHA256)."""
    k = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def presign_get(
    shape: UrlShape,
    key: str,
    access_key: str,
    token: str | None,
    expires: int,
    now: datetime,
    key_for_day: Callable[[str], bytes],
    version_id: str | None = None,
) -> str:
    """A GET of ``key`` presigned at ``now`` for ``expires`` seconds; ``key_for_day``
    gives the signing key of a day (``YYYYMMDD``), so the caller may keep it.

    The URL is already encoded and must be sent exactly as it stands: S3 checks the
    signature over the path as it arrives, without normalising it, so a client that
    re-encodes it (aiohttp given a str: ``%3D`` decoded to ``=``, ``./`` resolved) is
    refused with SignatureDoesNotMatch. Pass ``yarl.URL(url, encoded=True)``."""
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{shape.region}/{shape.service}/aws4_request"
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }
    if token is not None:
        params["X-Amz-Security-Token"] = token
    if version_id is not None:
        params["versionId"] = version_id
    encoded = [(quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params.items()]
    query = "&".join(f"{k}={v}" for k, v in sorted(encoded))  # canonical: sorted
    in_url = "&".join(f"{k}={v}" for k, v in encoded)  # as botocore writes it
    host = sent_host(shape.scheme, shape.host)
    path = shape.before + quote(key, safe="/~") + shape.after
    canonical = f"GET\n{path}\n{query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n" + hashlib.sha256(canonical.encode()).hexdigest()
    )
    signature = hmac.new(key_for_day(day), to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{shape.scheme}://{host}{path}?{in_url}&X-Amz-Signature={signature}"
