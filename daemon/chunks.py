"""A block's bytes: one buffer the socket filled (http1.py), or, read through aiohttp
(an egress proxy, a bandwidth cap), the chunks it allocated, kept as they are.

Hashing and uploading walk the list, so no payload byte is copied into another buffer
on its way from S3's socket to Azure's. Neither side owns it: the S3 reader fills one,
the Azure writer sends it, verification hashes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

PIECE = 1024 * 1024  # a body goes to a socket in views of this size: each one sent is progress


def pieces(body: Iterable[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
    """A body's chunks as views of at most PIECE bytes, not copies."""
    for chunk in body:
        view = memoryview(chunk)
        for at in range(0, len(view), PIECE):
            yield view[at : at + PIECE]


class Chunks(list[bytes | bytearray]):
    """A block's bytes as received: a list of chunks, and their total size."""

    size: int = 0

    @classmethod
    def of(cls, buffer: bytearray) -> Chunks:
        """A block read whole into one buffer."""
        chunks = cls([buffer])
        chunks.size = len(buffer)
        return chunks

    def join(self) -> bytes:
        return b"".join(self)
