"""Addresses and names: ``s3://bucket/key``, ``az://container/blob`` or a blob's
https:// URL, and what Azure takes in a blob name or a header value.

S3 keys allow what blob names do not (a ``.`` segment, control characters), so every
destination is checked here, a prefix's children included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from daemon.errors import AddressError

# Hosts that carry the account name as their first label (public and sovereign clouds).
# Hosts that carry the account name as their first label (public and sovereign clouds).
_AZURE_HOST_SUFFIXES = (
    ".blob.core.windows.net",
    ".blob.core.chinacloudapi.cn",
    ".blob.core.usgovcloudapi.net",
)


@dataclass(frozen=True, slots=True)
class S3Address:
    bucket: str
    key: str

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, key: str) -> S3Address:
        return S3Address(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class AzAddress:
    container: str
    blob: str
    account_url: str | None = None  # None: the configured account

    @property
    def is_prefix(self) -> bool:
        return self.blob == "" or self.blob.endswith("/")

    def child(self, blob: str) -> AzAddress:
        return AzAddress(self.container, blob, self.account_url)

    @property
    def account(self) -> str | None:
        """The account the address names (None: the configured one), as Azure knows
        it: ``https://NAME.blob.core.windows.net`` or path-style ``http://host/NAME``."""
        return None if self.account_url is None else account_name(self.account_url)

    def __str__(self) -> str:
        if self.account_url:
            return f"{self.account_url}/{self.container}/{self.blob}"
        return f"az://{self.container}/{self.blob}"


def account_name(account_url: str) -> str:
    """The account of an account URL (a SAS query, if any, is no part of it)."""
    parts = urlsplit(account_url)
    path = parts.path.strip("/")
    return path.split("/")[0] if path else parts.netloc.split(".")[0]


def parse_s3(address: str) -> S3Address:
    if not address.startswith("s3://"):
        raise AddressError(address, "a source must start with s3://")
    bucket, _, key = address[5:].partition("/")
    if not bucket:
        raise AddressError(address, "no bucket name")
    if not (3 <= len(bucket) <= 63):
        raise AddressError(address, "bucket names are 3 to 63 characters")
    return S3Address(bucket, key)


def parse_azure(address: str) -> AzAddress:
    if address.startswith("az://"):
        container, _, blob = address[5:].partition("/")
        return _checked(address, AzAddress(container, blob))
    if address.startswith(("https://", "http://")):
        parts = urlsplit(address)
        if parts.query:
            raise AddressError(address, "put SAS tokens in settings, not in the address")
        host = parts.netloc
        path = unquote(parts.path).lstrip("/")
        if host.endswith(_AZURE_HOST_SUFFIXES):
            account_url = f"{parts.scheme}://{host}"
        else:
            # An emulator or custom endpoint: path-style, the account is the first segment.
            account, _, path = path.partition("/")
            if not account:
                raise AddressError(address, "no account in the URL path")
            account_url = f"{parts.scheme}://{host}/{account}"
        container, _, blob = path.partition("/")
        return _checked(address, AzAddress(container, blob, account_url))
    raise AddressError(address, "a destination must start with az:// or https://")


def _checked(address: str, az: AzAddress) -> AzAddress:
    c = az.container
    if not c:
        raise AddressError(address, "no container name")
    valid = (
        3 <= len(c) <= 63
        and c[0].isalnum()
        and all(ch.islower() or ch.isdigit() or ch == "-" for ch in c)
        and "--" not in c
        and not c.endswith("-")
    )
    if not valid and c != "$root":
        raise AddressError(
            address,
            "container names are 3-63 lowercase letters, digits and single hyphens",
        )
    problem = blob_name_problem(az.blob)
    if problem:
        raise AddressError(address, problem)
    return az


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def blob_name_problem(name: str) -> str | None:
    """Why Azure cannot hold a blob under exactly ``name``, or None. Checked for every
    destination, a prefix's children included, since their names come from S3 keys,
    which allow what blob names do not."""
    if len(name) > 1024:
        return "blob names are at most 1024 characters"
    segments = name.split("/")
    if "." in segments or ".." in segments:
        # Azure resolves these as a URL path does, however they are escaped: 'a/./b'
        # would land as 'a/b' and 'a/../../b' outside the destination, silently
        # replacing whatever is there.
        return (
            "a '.' or '..' path segment in a blob name is resolved away by Azure, so the "
            "blob would land under another name; give this object a destination of its own"
        )
    if _CONTROL.search(name):
        return "blob names cannot hold control characters"
    return None


def header_safe(value: str) -> bool:
    """Whether Azure takes ``value`` in a header (a property, metadata): printable ASCII
    only; anything else it refuses as a bad signature."""
    return value.isascii() and value.isprintable()
