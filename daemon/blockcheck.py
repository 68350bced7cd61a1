"""What Azure checks a staged block against as it arrives: the block's MD5, or its
CRC-64/NVME (the ``x-ms-content-crc64`` header, 8 bytes little-endian in base64); and
what it checks a Put Blob of a whole object against, S3's own value (``whole_check``).

The MD5 only where it is itself the proof: a multipart object cut one block per part,
whose block MD5s are the part MD5s S3's composite ETag is made of. Everywhere else a
CRC, about a twelfth of an MD5's CPU (awscrt, hardware accelerated: 0.11 against 1.39
CPU s/GiB here), guards the block on its way; the blocks' CRCs put together are S3's
CRC64NVME of the object, where S3 keeps one (verify.py), and otherwise the in-order
pass proves it: each byte is hashed with MD5 at most once.

A block's fingerprint is 16 bytes either way, as its ID holds it (layout.py): the MD5,
or the CRC's 8 bytes followed by 8 zero bytes, so a resumed run tells which its staged
blocks carry. Where S3 keeps the object's CRC64NVME, every block carries its CRC64, one
block per part too: put together, they are the proof (routes/blocks.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from enum import StrEnum

from awscrt import checksums

from daemon.chunks import Chunks
from daemon.layout import Plan
from daemon.objects import ObjectInfo
from daemon.verify import AZURE_CHECKED, AZURE_CHECKED_CRC64, md5_of, md5_off_loop

_PAD = bytes(8)


class Kind(StrEnum):
    MD5 = "md5"
    CRC64 = "crc64"

    @classmethod
    def of(cls, plan: Plan, otherwise: str = "crc64") -> Kind:
        """MD5 where the plan's block MD5s prove the object, else ``otherwise``
        (azure.block_check)."""
        if plan.one_block_per_part:
            return cls.MD5
        return cls(otherwise)


@dataclass(frozen=True, slots=True)
class BlockCheck:
    kind: Kind
    fingerprint: bytes  # 16 bytes, as the block's ID holds it

    def headers(self) -> dict[str, str]:
        if self.kind is Kind.MD5:
            return {"Content-MD5": base64.b64encode(self.fingerprint).decode()}
        return {"x-ms-content-crc64": base64.b64encode(self.fingerprint[:8]).decode()}

    @property
    def md5(self) -> bytes | None:
        return self.fingerprint if self.kind is Kind.MD5 else None


def crc64_of(fingerprint: bytes | None) -> int | None:
    """The block's CRC64 where its fingerprint holds one; None for an MD5 (a block an
    earlier blobferry staged under its MD5) or an unknown block."""
    if fingerprint is None or fingerprint[8:] != _PAD:
        return None
    return int.from_bytes(fingerprint[:8], "little")


def of_s3_crc64nvme(value: str) -> BlockCheck:
    """Azure's check against S3's CRC64NVME of the same bytes: one CRC, which S3 gives
    big-endian and Azure takes little-endian, each in base64."""
    crc = int.from_bytes(base64.b64decode(value), "big")
    return BlockCheck(Kind.CRC64, crc.to_bytes(8, "little") + _PAD)


def whole_check(info: ObjectInfo) -> tuple[BlockCheck, str] | None:
    """What Azure can check a Put Blob of the whole object against, S3's own value,
    and how the report names that proof; None where S3 holds neither. The MD5 first:
    Azure then stores S3's value as the blob's Content-MD5."""
    if info.md5 is not None:
        return BlockCheck(Kind.MD5, info.md5), AZURE_CHECKED
    crc = info.full_checksum("crc64nvme")
    if crc is not None:
        return of_s3_crc64nvme(crc), AZURE_CHECKED_CRC64
    return None


def compute(kind: Kind, data: Chunks) -> BlockCheck:
    if kind is Kind.MD5:
        return BlockCheck(kind, md5_of(data))
    crc = 0
    for chunk in data:
        crc = checksums.crc64nvme(chunk, crc)
    return BlockCheck(kind, crc.to_bytes(8, "little") + _PAD)


async def compute_off_loop(kind: Kind, data: Chunks) -> BlockCheck:
    # An MD5 of a large block goes to a thread as every MD5 does (md5_off_loop). A CRC
    # is done on the loop: 0.4 ms for 4 MiB, less than the thread hop's own cost.
    if kind is Kind.MD5:
        return BlockCheck(kind, await md5_off_loop(data))
    return compute(kind, data)
