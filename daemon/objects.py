"""What S3 says of an object: its ETag, size, version, properties and checksums, from
a HEAD, a whole-object GET or a listing; and what they make of it (whether the ETag is
an MD5, how many parts it was uploaded in, whether it is archived).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from daemon.addresses import S3Address
from daemon.errors import PermanentError

# Storage classes whose objects cannot be read until someone restores them.
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
CHECKSUMS = ("crc64nvme", "crc32c", "crc32", "sha1", "sha256")  # S3's additional checksums
_MD5_HEX = re.compile(r"[0-9a-f]{32}\Z")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD (or a whole-object GET) tells about an object."""

    bucket: str
    key: str
    size: int
    etag: str  # with its quotes, exactly as S3 sends it: the If-Match value
    version_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_disposition: str | None = None
    cache_control: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None
    restore: str | None = None
    sse: str | None = None
    sse_customer: bool = False
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm -> base64 value
    checksum_type: str | None = None  # FULL_OBJECT or COMPOSITE

    def full_checksum(self, algorithm: str) -> str | None:
        """S3's checksum of the whole object by ``algorithm``, if it holds one (base64).
        A composite one (of the parts' checksums) ends in "-N", with or without its type."""
        value = self.checksums.get(algorithm)
        if self.checksum_type == "COMPOSITE" or value is None or "-" in value:
            return None
        return value

    @property
    def etag_is_md5(self) -> bool:
        """Whether the ETag can prove the bytes: an MD5, or a multipart composite of them."""
        return self.md5 is not None or (self.parts > 0 and not self.encrypted_etag)

    @property
    def md5(self) -> bytes | None:
        """The object's MD5, when its ETag is one: a single-part object, not encrypted
        with SSE-KMS or SSE-C."""
        bare = self.etag.strip('"')
        if self.encrypted_etag or not _MD5_HEX.match(bare):
            return None
        return bytes.fromhex(bare)

    @property
    def encrypted_etag(self) -> bool:
        """SSE-KMS and SSE-C objects have ETags that are not the MD5 of their bytes."""
        return self.sse_customer or (self.sse or "").startswith("aws:kms")

    @property
    def archived(self) -> bool:
        """In Glacier or Deep Archive and not restored: unreadable until someone restores it."""
        cold = self.storage_class in ARCHIVE_CLASSES
        return cold and 'ongoing-request="false"' not in (self.restore or "")

    def raise_if_unreadable(self) -> None:
        if self.archived:
            raise ArchivedObjectError(self.address, self.storage_class)

    @property
    def address(self) -> S3Address:
        return S3Address(self.bucket, self.key)

    @property
    def parts(self) -> int:
        """Parts of a multipart upload (from the ETag's ``-N``), or 0 for a single part."""
        bare = self.etag.strip('"')
        tail = bare.rpartition("-")[2]
        return int(tail) if "-" in bare and tail.isdigit() else 0


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    size: int
    etag: str
    storage_class: str | None = None


def info_from_headers(bucket: str, key: str, headers: Mapping[str, str]) -> ObjectInfo:
    h = {k.lower(): v for k, v in headers.items()}
    size = h.get("content-length", "0")
    if "content-range" in h:  # a ranged GET: the total is after the slash
        m = CONTENT_RANGE.match(h["content-range"])
        if m and m.group(3) != "*":
            size = m.group(3)
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(size),
        etag=h.get("etag", ""),
        version_id=h.get("x-amz-version-id"),
        content_type=h.get("content-type"),
        content_encoding=h.get("content-encoding"),
        content_language=h.get("content-language"),
        content_disposition=h.get("content-disposition"),
        cache_control=h.get("cache-control"),
        metadata={k[11:]: v for k, v in h.items() if k.startswith("x-amz-meta-")},
        storage_class=h.get("x-amz-storage-class"),
        restore=h.get("x-amz-restore"),
        sse=h.get("x-amz-server-side-encryption"),
        sse_customer="x-amz-server-side-encryption-customer-algorithm" in h,
        checksums={
            k[15:]: v
            for k, v in h.items()
            if k.startswith("x-amz-checksum-") and k[15:] in CHECKSUMS
        },
        checksum_type=h.get("x-amz-checksum-type"),
    )


class ArchivedObjectError(PermanentError):
    def __init__(self, address: S3Address, storage_class: str | None) -> None:
        super().__init__(
            f"{address} is archived ({storage_class or 'InvalidObjectState'}) and not "
            "restored; restore it in S3 first, then submit the job again"
        )
