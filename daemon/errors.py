"""The exception hierarchy.

Whether a failure is worth retrying is decided by its type, never by matching text:
``RetryableError`` means "the same request may well succeed later" (a reset, a stall,
a 5xx, throttling, a block that arrived damaged); ``PermanentError`` means a person has
to act (a missing key, a denied credential, a bad name). Messages are built in
``__init__`` so every raise site reads the same, and none of them carries a secret.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import ssl

import aiohttp

# A URL's query string can carry a SAS token or an S3 presigned signature and
# session token; no message that leaves the process may keep one.
_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#'\"]*)\?[^\s'\"]*", re.IGNORECASE)
_SECRET_PAIRS = re.compile(
    r"(AccountKey|SharedAccessSignature|sig|X-Amz-Signature|X-Amz-Security-Token|"
    r"X-Amz-Credential|Signature|AWSAccessKeyId)=[^;&\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URL query strings and key=secret pairs blanked out."""
    return _SECRET_PAIRS.sub(r"\1=<redacted>", _URL_QUERY.sub(r"\1?<redacted>", text))


def connection_failed(e: BaseException) -> str:
    """Why a connection failed, as the OS said it: a host that does not resolve, a
    refused port, too many open files. The class name alone hid which. Both sides'
    requests word their connection failures with it."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return os_refusal(e, e.os_error, e.host, e.port)
    detail = str(e)
    return f"connection failed ({type(e).__name__}{': ' + detail if detail else ''})"


def os_refusal(e: BaseException, os_error: OSError, host: str, port: int | None) -> str:
    """A connection to ``host:port`` that ``os_error`` stopped, named as ``e`` and worded
    plainly: asyncio words a refusal "Connect call failed (...)", the errno says it.
    A resolver's or TLS's error carries its own words (a TLS errno is no OS errno)."""
    own_words = isinstance(os_error, socket.gaierror | ssl.SSLError)
    errno = 0 if own_words else os_error.errno or 0
    reason = os.strerror(errno) if errno > 0 else os_error.strerror or str(os_error)
    return f"connection failed ({type(e).__name__}: {host}:{port}: {reason})"


class BlobferryError(Exception):
    """Base of every error blobferry raises on purpose."""


class ConfigError(BlobferryError):
    """A missing or contradictory setting; start-up stops with this one line."""


class JobFileError(BlobferryError):
    """A job file that cannot be run as written."""


class AddressError(JobFileError):
    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"bad address {address!r}: {why}")
        self.address = address


class TransferError(BlobferryError):
    """A transfer could not complete."""

    # Another attempt later may well succeed (a link down past every retry, a source or
    # blob that changed under the copy): a queue's job is then released, not deleted.
    transient = False


class PermanentError(TransferError):
    """Retrying will not help; the message says what a person should fix."""


class RetryableError(TransferError):
    """A passing fault: the same request may succeed if tried again."""


class StallError(RetryableError):
    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what}: no byte received for {seconds:g} s, connection abandoned")


class CorruptBlockError(RetryableError):
    """Bytes did not match their checksum on the way; the block is read and sent again."""


class SourceChangedError(PermanentError):
    transient = True

    def __init__(self, source: str) -> None:
        super().__init__(
            f"{source} changed while it was being copied (its ETag no longer matches); "
            "nothing was committed, submit the job again to copy the new version"
        )


class ObjectMissingError(PermanentError):
    """S3 holds no object under the key (the bucket exists)."""


class VerificationError(PermanentError):
    """The copied bytes do not match what the source says it holds."""


class RetriesExhaustedError(PermanentError):
    transient = True

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        super().__init__(f"{what}: gave up after {attempts} attempts; last error: {last}")
        self.last = last


class SourceUnreachableError(PermanentError):
    """Azure could not fetch the source URL itself (Put Block From URL)."""

    def __init__(self, dst: object, code: str) -> None:
        super().__init__(f"{dst}: Azure could not read the source URL ({code})")
        self.code = code


class NotPermittedError(PermanentError):
    """The credentials are good but lack a permission (a write-only SAS reading, say)."""

    def __init__(self, dst: object, what: str) -> None:
        super().__init__(
            f"{dst}: {what}: the credentials are not permitted to do this "
            "(AuthorizationPermissionMismatch); grant it on the container"
        )


class ContainerMissingError(PermanentError):
    """The destination's container does not exist (and was not to be created)."""

    def __init__(self, where: str, container: str) -> None:
        super().__init__(
            f"{where}: container {container!r} does not exist; create it, or set "
            "azure.create_containers = true"
        )


class DestinationExistsError(PermanentError):
    def __init__(self, destination: object) -> None:
        super().__init__(f"{destination} already exists and overwrite is 'never'")


class BlobChangedError(PermanentError):
    """A conditional write refused: the blob is no longer the one the transfer looked at
    (another writer committed in between). The copy looks again; nothing was lost."""

    transient = True

    def __init__(self, destination: object) -> None:
        super().__init__(
            f"{destination} changed while it was being copied (another writer committed "
            "it); nothing of this copy was committed over it"
        )


class StateError(BlobferryError):
    """The state database cannot be written: most likely its disk is full.

    Nothing is recorded reliably after that, so the daemon stops (systemd starts it
    again); started with room to write, it resumes every job where it was."""

    def __init__(self, path: str, error: BaseException) -> None:
        self.cause = error
        # Not a database, a malformed image: SQLite raises exactly DatabaseError for
        # those; a full disk, a read-only file or a lock is an OperationalError.
        self.damaged = type(error) is sqlite3.DatabaseError
        codes = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        self.locked = getattr(error, "sqlite_errorcode", None) in codes
        if self.locked:
            super().__init__(
                f"the state database {path} is locked by another process (a `blobferry "
                "copy` or a second daemon with the same state_dir) that kept it past the "
                "wait; its rows wait for the next write"
            )
            return
        if self.damaged:
            super().__init__(
                f"the state database {path} is damaged ({error}); the daemon moves it "
                "aside when it starts and begins a new one"
            )
            return
        super().__init__(
            f"cannot write the state database {path} ({error}); free space on its disk "
            "or fix its permissions. blobferry stops; started again, it resumes every job "
            "where it was"
        )


class Interrupted(BlobferryError):
    """The daemon is stopping: the transfer was left to resume on the next start."""

    def __init__(self) -> None:
        super().__init__("interrupted by shutdown; resumes on the next start")
