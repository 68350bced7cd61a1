"""Where the reports of queue jobs go (``sqs.results``): a blob prefix, an S3 prefix or a
folder. A report is written whole before its message is deleted, so a job a daemon
lost between the two is run again, never left without its report.

A report is named by its job (``sqs-<message ID>``); a page spread from a prefix job
goes beside the others of that job, under ``<parent job>/``, so the prefix job's own
report and its pages' are one listing.

A report is at most one message's job (256 KiB of transfers at most), so it is built
in memory, never on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from daemon.addresses import parse_azure, parse_s3
from daemon.blockcheck import BlockCheck, Kind
from daemon.chunks import Chunks
from daemon.properties import BlobHeaders
from daemon.retry import retrying
from daemon.s3 import S3Reader
from daemon.seams import ANYTHING, BlobSink
from daemon.service_settings import RetrySettings

WriteReport = Callable[[IO[str]], object]


class Results:
    def __init__(self, where: str, sink: BlobSink, s3: S3Reader, policy: RetrySettings) -> None:
        self.where = where
        self._sink = sink
        self._s3 = s3
        self._policy = policy

    def name(self, job: str, parent: str | None) -> str:
        return f"{parent}/{job}.report.json" if parent else f"{job}.report.json"

    async def write(self, job: str, parent: str | None, write_report: WriteReport) -> str:
        """The job's report, written whole; returns where it is."""
        buf = io.StringIO()
        write_report(buf)
        data = buf.getvalue().encode()
        name = self.name(job, parent)
        if self.where.startswith("az://"):
            dst = parse_azure(self.where + name)
            chunks = Chunks()
            chunks.append(data)
            chunks.size = len(data)
            headers = BlobHeaders(content_type="application/json")
            check = BlockCheck(Kind.MD5, hashlib.md5(data).digest())
            await retrying(
                lambda: self._sink.put(dst, chunks, check, headers, {}, ANYTHING),
                self._policy,
                f"report {dst}",
            )
            return str(dst)
        if self.where.startswith("s3://"):
            address = parse_s3(self.where + name)
            await retrying(
                lambda: self._s3.put_small(address, data, "application/json"),
                self._policy,
                f"report {address}",
            )
            return str(address)
        path = Path(self.where) / name
        await asyncio.to_thread(_write_file, path, data)
        return str(path)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
