"""Azure's refusals as blobferry's errors: retryable or permanent by type, each with a
message a person can act on. SDK messages are not passed through, so no URL or token
can leak.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceResponseError,
)

from daemon.addresses import AzAddress
from daemon.clock import refused_for_time
from daemon.errors import (
    BlobChangedError,
    ContainerMissingError,
    CorruptBlockError,
    DestinationExistsError,
    NotPermittedError,
    PermanentError,
    RetryableError,
    connection_failed,
)
from daemon.proxies import refused_by_proxy

_RETRYABLE_CODES = {"ServerBusy", "InternalError", "OperationTimedOut", "ServiceUnavailable"}
# Refusals a person can act on, by Azure's error code: what is wrong and what to do.
_LEASED = "the blob has an active lease; break or release it, or let it expire"
_TIER = "Azure refused the access tier; change the job's 'tier' or the 'tiers' setting"
_WHY = {
    "InvalidResourceName": "Azure rejected the name",
    "InvalidBlobOrBlock": "Azure rejected the name or a block",
    "InvalidUri": "Azure rejected the name",
    "InvalidMetadata": "Azure rejected the metadata",
    "InvalidBlobType": "a page or append blob holds this name and blocks cannot be staged "
    "into it; delete it or choose another destination",
    "LeaseIdMissing": _LEASED,
    "LeaseIdMismatchWithBlobOperation": _LEASED,
    "BlobImmutableDueToPolicy": "the blob is immutable (a retention policy or legal hold)",
    "ContainerBeingDeleted": "the container is being deleted, which takes Azure 30 s or "
    "more; submit the job again once it is gone",
    "InvalidBlobTier": _TIER,
    "BlobAccessTierNotSupportedForAccountType": _TIER,
}


class TokenError(ClientAuthenticationError):
    """No Azure AD token: the identity failed (its endpoint, its setup), not Azure
    Storage, which never saw a request. ``passing``: the endpoint was down or busy."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(message=f"no Azure AD token ({type(cause).__name__})")
        status = getattr(cause, "status_code", None) or 0
        self.detail = f"{type(cause).__name__} {status}" if status else type(cause).__name__
        connection = isinstance(cause, (ServiceRequestError, ServiceResponseError))
        self.passing = connection or status >= 500 or status == 429


def sas_expiry(sas: str) -> datetime | None:
    """The end of a SAS token's validity (its ``se``), if it is one and says."""
    end = parse_qs(sas).get("se", [""])[0]
    try:
        when = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)


def error_code(e: AzureError) -> str:
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")  # the SDK's enum, or a plain string


def translate(
    e: AzureError, dst: AzAddress, what: str, sas_expiry: datetime | None = None
) -> Exception:
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return RetryableError(f"{dst}: {what}: {connection_failed(e.inner_exception or e)}")
    if isinstance(e, TokenError) and e.passing:
        return RetryableError(f"{dst}: {what}: the identity endpoint gave no token ({e.detail})")
    if isinstance(e, TokenError):
        return PermanentError(
            f"{dst}: {what}: no Azure AD token for this machine's identity ({e.detail}); "
            "check its managed identity (or azure-identity's other sources), or set "
            "azure.account_key or azure.sas_token"
        )
    status = getattr(e, "status_code", None) or 0
    if isinstance(e, ClientAuthenticationError) and status not in (401, 403):
        status = 403  # the SDK found the credential unusable before sending anything
    response = getattr(e, "response", None)
    date = response.headers.get("Date") if response is not None else None
    return failure(status, error_code(e) or type(e).__name__, dst, what, sas_expiry, date)


def failure(
    status: int,
    code: str,
    dst: AzAddress,
    what: str,
    sas_expiry: datetime | None = None,
    date: str | None = None,
) -> Exception:
    """Azure's answer ``status`` with error code ``code``, as an error to act on.
    ``sas_expiry``: when the credential is a SAS token, its end (``se``); ``date``: the
    answer's Date header, Azure's time."""
    where = f"{dst}: {what}"
    if status == 407 and not code:  # a plain-http request, refused by the proxy itself
        return refused_by_proxy(407, where)
    if code == "ContainerNotFound":
        return ContainerMissingError(where, dst.container)
    if code == "BlobAlreadyExists":  # only a write conditional on absence gets this
        return DestinationExistsError(dst)
    if status == 412 and code in ("ConditionNotMet", ""):  # If-Match: another committed
        return BlobChangedError(dst)
    if code == "AuthorizationPermissionMismatch":
        return NotPermittedError(dst, what)  # authenticated: the clock was right enough
    if status in (401, 403) and (skewed := refused_for_time(where, "Azure", date)):
        return skewed  # before the SAS check, which reads this machine's clock
    if status in (401, 403) or code in ("AuthorizationFailure", "AuthenticationFailed"):
        if sas_expiry is not None and sas_expiry <= datetime.now(UTC):
            # A transfer of days outlives a SAS of hours: say so, not "check the token".
            return PermanentError(
                f"{where}: the SAS token expired at {sas_expiry:%Y-%m-%d %H:%M:%S} UTC "
                f"({code or status}); put a new one in the settings, restart, and submit "
                "the job again: the blocks already staged are reused"
            )
        return PermanentError(
            f"{where}: Azure refused the credentials ({code or status}); check the account "
            "key, SAS token or identity and its permissions on the container"
        )
    if code in ("Md5Mismatch", "Crc64Mismatch"):
        return CorruptBlockError(f"{where}: Azure received damaged bytes ({code})")
    if code in _RETRYABLE_CODES or status >= 500 or status in (408, 429):
        return RetryableError(f"{where}: Azure answered {status} {code}")
    if code in _WHY:
        return PermanentError(f"{where}: {_WHY[code]} ({code})")
    return PermanentError(f"{where}: Azure answered {status} {code}".rstrip())
