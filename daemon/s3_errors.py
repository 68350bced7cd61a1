"""S3's refusals as blobferry's errors: retryable or permanent by type, each with a
message a person can act on (a wrong secret is not a missing permission, a skewed
clock is not a wrong key), and none carrying a secret.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol
from xml.etree import ElementTree

from botocore.exceptions import ClientError

from daemon.addresses import S3Address
from daemon.clock import refused_for_time
from daemon.errors import (
    ObjectMissingError,
    PermanentError,
    RetryableError,
    SourceChangedError,
)
from daemon.objects import ArchivedObjectError
from daemon.proxies import refused_by_proxy

_REFUSED = (400, 401, 403)  # how S3 answers a request signed at the wrong time
_RETRYABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}


async def explain(
    e: ClientError, address: S3Address, bucket_exists: Callable[[str], Awaitable[bool]]
) -> Exception:
    """A botocore call's refusal, as what a person can act on."""
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    meta = e.response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode", 0)
    if status in _REFUSED and (
        skewed := refused_for_time(str(address), "S3", meta.get("HTTPHeaders", {}).get("date"))
    ):
        return skewed
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        if code != "NoSuchBucket" and await bucket_exists(address.bucket):
            return ObjectMissingError(f"{address}: no such key in bucket {address.bucket!r}")
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


class Refusal(Protocol):
    """A payload GET's response, from aiohttp or from http1.py."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    async def read(self) -> bytes: ...


async def raise_for(resp: Refusal, address: S3Address, what: str) -> None:
    """A payload GET's refusal (its XML body read), raised as what a person can act on."""
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


def _error_code(body: bytes) -> tuple[str, str]:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


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


def no_credentials() -> PermanentError:
    return PermanentError(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "a profile (s3.profile), or run with an instance role"
    )
