"""One object, S3 to Azure, by one of three routes: whole (a block or less, held here
for one Put Blob), pipe (on a near link, one GET streamed into one Put Blob that Azure
checks against S3's MD5 ETag), or blocks: plan, read ranges, stage, verify, commit.

Nothing here knows where a job came from or writes anything to local disk. A block's
bytes live in one buffer, from the ranged GET that fills it until Azure has
acknowledged it; the buffer's size is reserved in the shared Budget first.

Block IDs are ``<24 hex of the source's identity><6-digit index><32 hex MD5>``. The
identity hashes bucket, key, ETag, version, size and block size, so a later run
recognises blocks it staged for the same version of the same object and never mistakes
another's; the MD5 (which Azure checked when the block arrived) lets that run rebuild a
multipart object's composite ETag from Azure's block list alone, without re-reading.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import ClassVar, Protocol, TypeVar

import structlog
from awscrt import checksums as awscrt_checksums

from daemon.azure import (
    AzureWriter,
    BlobHeaders,
    BlobId,
    ContainerMissingError,
    DestinationExistsError,
    ExistingBlob,
    NotPermittedError,
    SourceUnreachableError,
    ascii_disposition,
    azure_metadata,
)
from daemon.budget import Budget
from daemon.errors import (
    CorruptBlockError,
    Interrupted,
    PermanentError,
    RetryableError,
    SourceChangedError,
    TransferError,
    VerificationError,
)
from daemon.holdings import Holdings, Known
from daemon.jobs import (
    AzAddress,
    Overwrite,
    S3Address,
    TransferSpec,
    blob_name_problem,
    header_safe,
)
from daemon.latency import FAR_AFTER, RoundTrips
from daemon.retry import retrying
from daemon.s3 import ARCHIVE_CLASSES, ArchivedObjectError, Chunks, Listed, ObjectInfo, S3Reader
from daemon.settings import MiB, Settings

MAX_BLOCKS = 50_000
MAX_BLOCK_SIZE = 4000 * MiB
WHOLE_PART_MAX = 16 * MiB
PIPE_BUFFER = MiB
_ID_LENGTH = 24 + 6 + 32  # identity, index, MD5: every ID the same length, as Azure requires
_SENT_LENGTH = len(base64.b64encode(bytes(_ID_LENGTH)))  # as Azure holds it: base64


def _sent_length(block_id: str) -> int:
    """A staged block's ID length as Azure compares it, base64. The SDK hands an ID back
    decoded where it decodes to text, as sent where it does not."""
    try:
        base64.b64decode(block_id, validate=True).decode()
    except UnicodeDecodeError:
        return len(block_id)  # binary underneath: handed back as sent
    except ValueError:
        pass  # not base64 at all: decoded text
    return len(base64.b64encode(block_id.encode()))


T = TypeVar("T")


class Progress(Protocol):
    """A transfer's bytes done: moved now, or ``reused``: found staged by an earlier
    run, done without moving (no throughput, no rate)."""

    def __call__(self, n: int, *, reused: bool = False) -> None: ...


def _unwatched(n: int, *, reused: bool = False) -> None:
    """The Progress of a copy no one watches."""


SourceUrls = Callable[[ObjectInfo], Awaitable[str]]
AZURE_CHECKED = "etag: Azure checked the bytes against S3's MD5 as they arrived"
SERVER_SIDE_CHECKED = "etag: Azure checked the bytes it fetched from S3 against S3's MD5"
SERVER_SIDE_MD5 = bytes(16)  # server-side blocks: no bytes here, so no MD5 in the ID
UNREACHABLE_FOR_S = 300.0  # how long "Azure cannot reach this bucket" is believed
log = structlog.get_logger("blobferry.transfer")


class Status(StrEnum):
    COPIED = "copied"
    SKIPPED = "skipped"
    FAILED = "failed"


DRY_RUN = "dry run: would be copied"


@dataclass(slots=True)
class Outcome:
    """What became of one object."""

    status: Status
    bytes: int = 0
    verified: str | None = None
    note: str | None = None
    # How the blob's properties landed: metadata keys renamed, values left off.
    landing: Landing | None = None
    blocks_reused: int = 0
    # How the bytes went: "whole" (one GET, one Put Blob, held here), "pipe" (one GET
    # streamed into one Put Blob), "blocks" (ranges staged in parallel) or "server-side".
    route: str | None = None
    would_copy: int | None = None  # a dry run's: the bytes a copy would move


@dataclass(frozen=True, slots=True)
class Block:
    index: int
    start: int
    length: int
    part: int  # which S3 part the block lies in; 0 for a single-part object


@dataclass(frozen=True, slots=True)
class Plan:
    block_size: int
    blocks: tuple[Block, ...]
    parts: int  # the S3 parts the blocks are aligned to; 0 when not aligned
    id_prefix: str

    def block_id(self, index: int, md5: bytes | None) -> str:
        assert md5 is not None, "every block has been staged before its ID is needed"
        return f"{self.id_prefix}{index:06d}{md5.hex()}"

    def parse_id(self, block_id: str) -> tuple[int, bytes] | None:
        """(index, MD5) of a block this plan staged, or None for anyone else's."""
        if len(block_id) != _ID_LENGTH or not block_id.startswith(self.id_prefix):
            return None
        index, md5 = block_id[24:30], block_id[30:]
        if not index.isdigit() or int(index) >= len(self.blocks):
            return None
        try:
            return int(index), bytes.fromhex(md5)
        except ValueError:
            return None


def choose_block_size(size: int, minimum: int) -> int:
    """The smallest whole number of MiB, at least ``minimum``, that keeps a blob of
    ``size`` bytes under Azure's 50,000 blocks."""
    needed = -(-size // MAX_BLOCKS)
    needed = -(-needed // MiB) * MiB
    return min(max(minimum, needed), MAX_BLOCK_SIZE)


def plan_blocks(
    info: ObjectInfo, minimum: int, part_sizes: list[int] | None = None, flavour: str = "stream"
) -> Plan:
    """Cut the object into blocks of at least ``minimum`` bytes, as few as Azure's
    50,000 allow; inside a multipart object no block crosses a part boundary, so each
    part's MD5 (and so S3's composite ETag) falls out of one pass."""
    if _parts_known(info, part_sizes):
        assert part_sizes is not None
        bs = minimum
        while sum(-(-p // bs) for p in part_sizes) > MAX_BLOCKS:
            bs *= 2
        plan = plan_layout(info, bs, part_sizes, flavour)
        if len(plan.blocks) <= MAX_BLOCKS:
            return plan
    return plan_layout(info, choose_block_size(info.size, minimum), None, flavour)


def _parts_known(info: ObjectInfo, part_sizes: list[int] | None) -> bool:
    """Whether blocks can be cut inside S3's parts: their sizes known, and the whole."""
    return bool(part_sizes) and sum(part_sizes or ()) == info.size


def plan_layout(
    info: ObjectInfo, bs: int, part_sizes: list[int] | None, flavour: str = "stream"
) -> Plan:
    """The blocks of ``bs`` bytes, inside S3's parts when ``part_sizes`` is given. The
    ID prefix names the object's version and this layout: a later run can tell from
    Azure's list of staged blocks which layout they were cut in."""
    spans: list[tuple[int, int, int]] = []  # (start, length, part)
    if part_sizes:
        # A part up to 16 MiB (or 1.5 blocks) stays whole: one block per part, whose MD5
        # is the part's, so one pass proves the composite ETag, even after a resume.
        # Uploaders' parts are mostly 5-16 MiB (boto3 and the AWS CLI use 8).
        limit = min(MAX_BLOCK_SIZE, max(bs + bs // 2, WHOLE_PART_MAX))
        pos = 0
        for part, psize in enumerate(part_sizes):
            n = 1 if psize <= limit else -(-psize // bs)
            step = -(-psize // n)
            for off in range(0, psize, step):
                spans.append((pos + off, min(step, psize - off), part))
            pos += psize
    else:
        spans = [(s, min(bs, info.size - s), 0) for s in range(0, info.size, bs)]
    blocks = tuple(Block(i, s, n, p) for i, (s, n, p) in enumerate(spans))
    layout = "a" if part_sizes else "u"
    prefix = f"{_object_identity(info, flavour)[:19]}{layout}{bs // MiB:04x}"
    return Plan(bs, blocks, len(part_sizes) if part_sizes else 0, prefix)


def _object_identity(info: ObjectInfo, flavour: str, *more: str) -> str:
    """A hash tied to this version of the object and the way it is copied (and to
    ``more``): 19 hex digits of it begin a block ID."""
    fields = (info.bucket, info.key, info.etag, info.version_id or "", str(info.size), *more)
    identity = "\n".join(fields) + ("" if flavour == "stream" else "\n" + flavour)
    return hashlib.sha256(identity.encode()).hexdigest()


def earlier_plan(
    prefix: str, plan: Plan, info: ObjectInfo, part_sizes: list[int] | None, flavour: str
) -> Plan | None:
    """The layout staged blocks whose IDs start with ``prefix`` were cut in, when it is
    another layout of the object ``plan`` (this run's, from ``plan_blocks``; its prefix
    begins with the object's identity) is for: block_size_mb changed between two runs
    of one transfer; or ``plan``'s own layout under the prefix of an earlier blobferry,
    whose IDs hashed the block size in (an upgrade between two runs). None for any other
    prefix: another object's, another version's, another tool's."""
    if prefix.startswith(plan.id_prefix[:19]) and prefix != plan.id_prefix:  # this object's
        layout, mib = prefix[19], prefix[20:]
        if (
            layout not in ("a", "u")
            or len(mib) != 4
            or not all(c in "0123456789abcdef" for c in mib)
        ):
            return None
        bs = int(mib, 16) * MiB
        aligned = layout == "a"
        if not MiB <= bs <= MAX_BLOCK_SIZE:
            return None
        if aligned and not _parts_known(info, part_sizes):
            return None
        other = plan_layout(info, bs, part_sizes if aligned else None, flavour)
        return other if len(other.blocks) <= MAX_BLOCKS else None
    if prefix == _object_identity(info, flavour, str(plan.block_size))[:24]:
        return dataclasses.replace(plan, id_prefix=prefix)
    return None


FINGERPRINT_KEY = "blobferry_fingerprint"
ETAG_KEY = "blobferry_source_etag"


def fingerprint(source: S3Address, etag: str, size: int) -> str:
    """The source version a blob was copied from: bucket, key, ETag and size."""
    text = "\n".join((source.bucket, source.key, etag.strip('"'), str(size)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Landing:
    """How a blob lands: its properties, and what of the source's did not carry."""

    headers: BlobHeaders
    metadata: dict[str, str]
    tier: str | None
    renamed: dict[str, str]  # metadata keys: S3's -> Azure's
    dropped: dict[str, str]  # property -> the value left off
    rewritten: dict[str, str] = dataclasses.field(default_factory=dict)  # property -> as sent


def headers_of(info: ObjectInfo) -> BlobHeaders:
    return BlobHeaders(
        content_type=info.content_type,
        content_encoding=info.content_encoding,
        content_language=info.content_language,
        content_disposition=info.content_disposition,
        cache_control=info.cache_control,
    )


def _md5(data: Chunks) -> bytes:
    h = hashlib.md5()
    for chunk in data:
        h.update(chunk)
    return h.digest()


async def md5_off_loop(data: Chunks) -> bytes:
    # hashlib releases the GIL on large buffers: a thread keeps the loop serving sockets.
    if data.size < 256 * 1024:
        return _md5(data)
    return await asyncio.to_thread(_md5, data)


class Checksum:
    """One of S3's additional full-object checksums, computed here in object order."""

    # Cheapest first. CRC32 from zlib; CRC32C and CRC64NVME from awscrt (hardware
    # accelerated); SHA-1 and SHA-256 from hashlib.
    ALGORITHMS = ("crc64nvme", "crc32c", "crc32", "sha1", "sha256")
    _CRCS: ClassVar[dict[str, tuple[Callable[[bytes, int], int], int]]] = {
        "crc32": (zlib.crc32, 4),
        "crc32c": (awscrt_checksums.crc32c, 4),
        "crc64nvme": (awscrt_checksums.crc64nvme, 8),
    }

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = None if algorithm in self._CRCS else hashlib.new(algorithm)

    @classmethod
    def for_object(cls, info: ObjectInfo) -> Checksum | None:
        if info.etag_is_md5 or info.checksum_type == "COMPOSITE":
            return None
        for algorithm in cls.ALGORITHMS:
            if algorithm in info.checksums:
                return cls(algorithm)
        return None

    def update(self, data: Chunks) -> None:
        if self._hash is not None:
            for chunk in data:
                self._hash.update(chunk)
            return
        crc = self._CRCS[self.algorithm][0]
        for chunk in data:
            self._crc = crc(chunk, self._crc)

    def value(self) -> str:
        if self._hash is not None:
            raw = self._hash.digest()
        else:
            raw = self._crc.to_bytes(self._CRCS[self.algorithm][1], "big")
        return base64.b64encode(raw).decode()


class _InOrderDigest:
    """The whole object's MD5 and each part's MD5, fed in object order whatever order
    the blocks arrive in. A block waits for its turn holding its buffer, which its
    budget reservation already accounts for."""

    def __init__(self, plan: Plan, checksum: Checksum | None = None) -> None:
        self._plan = plan
        self.checksum = checksum
        self.whole = hashlib.md5()
        self.part_digests: list[bytes] = []
        self._part: hashlib._Hash | None = None
        self._next = 0
        self._turn = asyncio.Condition()

    async def feed(self, block: Block, data: Chunks, block_md5: bytes) -> None:
        async with self._turn:
            await self._turn.wait_for(lambda: self._next == block.index)
        await asyncio.to_thread(self._update, block, data, block_md5)
        async with self._turn:
            self._next += 1
            self._turn.notify_all()

    def _update(self, block: Block, data: Chunks, block_md5: bytes) -> None:
        for chunk in data:
            self.whole.update(chunk)
        if self.checksum is not None:
            self.checksum.update(data)
        if not self._plan.parts:
            return
        blocks = self._plan.blocks
        first = block.index == 0 or blocks[block.index - 1].part != block.part
        last = block.index == len(blocks) - 1 or blocks[block.index + 1].part != block.part
        if first and last:
            self.part_digests.append(block_md5)
            return
        if first:
            self._part = hashlib.md5()
        assert self._part is not None
        for chunk in data:
            self._part.update(chunk)
        if last:
            self.part_digests.append(self._part.digest())
            self._part = None


def verify(
    info: ObjectInfo,
    whole_md5: bytes | None,
    part_digests: list[bytes] | None,
    checksum: Checksum | None = None,
) -> str:
    """How the copy was proven equal to the source; raises VerificationError on a mismatch."""
    etag = info.etag.strip('"')
    if checksum is not None:
        want = info.checksums[checksum.algorithm]
        if checksum.value() != want:
            raise VerificationError(
                f"{info.address}: {checksum.algorithm.upper()} of the bytes read is "
                f"{checksum.value()}, S3's checksum is {want}"
            )
        return f"checksum-{checksum.algorithm}"
    if info.encrypted_etag:
        kinds = ", ".join(sorted(info.checksums)) or "none"
        return f"size: the ETag of an SSE-KMS or SSE-C object is not an MD5 (checksums: {kinds})"
    if info.md5 is not None:
        if whole_md5 is None:
            return "size: the object's MD5 could not be computed in this run"
        if whole_md5 != info.md5:
            raise VerificationError(
                f"{info.address}: MD5 of the bytes read is {whole_md5.hex()}, S3's ETag is {etag}"
            )
        return "etag"
    if info.parts and part_digests is not None and len(part_digests) == info.parts:
        composite = hashlib.md5(b"".join(part_digests)).hexdigest() + f"-{info.parts}"
        if composite != etag:
            raise VerificationError(
                f"{info.address}: composite MD5 of the parts read is {composite}, "
                f"S3's ETag is {etag}"
            )
        return "multipart-etag"
    if info.checksums:
        kinds = ", ".join(sorted(info.checksums))
        return f"size: the ETag cannot serve and S3's checksums ({kinds}) are composite"
    return "size: the ETag is not an MD5 and no part layout was available"


def _held(plan: Plan, staged: dict[str, int]) -> dict[int, bytes]:
    """{index: MD5} of the staged blocks (ID: size) that are ``plan``'s, at its sizes."""
    found: dict[int, bytes] = {}
    for block_id, size in staged.items():
        parsed = plan.parse_id(block_id)
        if parsed is not None and plan.blocks[parsed[0]].length == size:
            found[parsed[0]] = parsed[1]
    return found


class Copier:
    """Copies one object at a time per call; many calls run concurrently, sharing the
    byte budget and both sides' connection pools."""

    def __init__(
        self,
        settings: Settings,
        s3: S3Reader,
        azure: AzureWriter,
        budget: Budget,
        stopping: asyncio.Event | None = None,
        source_urls: SourceUrls | None = None,
    ) -> None:
        self._settings = settings
        # Where Azure fetches ranges from in server-side mode: a URL presigned for each
        # block just before it is staged. A seam, so a test can point Azure at a source
        # it can reach (Azurite only fetches from itself).
        self._source_urls: SourceUrls = source_urls or s3.presign
        self._s3 = s3
        self._azure = azure
        self._budget = budget
        # Set when the daemon drains: no new transfer and no new block starts.
        self._stopping = stopping or asyncio.Event()
        # Buckets Azure could not fetch from in server-side mode: (when, its answer).
        self._unreachable: dict[str, tuple[float, str]] = {}

    def identify(self, dst: AzAddress) -> BlobId:
        """The blob a destination names, however it is spelled (one writer per blob)."""
        return self._azure.identify(dst)

    async def holdings(self, spec: TransferSpec) -> Holdings | None:
        """For a prefix whose copies would each ask whether their blob exists: the
        destination's listing, to tell them instead (see holdings.py). Its container
        is created first, where that is asked for, so it can be listed."""
        await self._container(spec)
        if spec.overwrite is Overwrite.ALWAYS or not spec.source.is_prefix:
            return None
        return Holdings(self._azure.listing(spec.destination, 1000))

    async def copy(
        self,
        spec: TransferSpec,
        listed: Listed | None = None,
        progress: Progress | None = None,
        known: Known | None = None,
    ) -> Outcome:
        """Copy ``spec`` (one object). Raises TransferError when it cannot. ``known``:
        what the destination's listing said of its blob, if it said anything."""
        if self._stopping.is_set():
            raise Interrupted()
        try:
            await self._container(spec)
            return await self._copy(spec, listed, progress or _unwatched, known)
        except ArchivedObjectError as e:
            if self._settings.archived == "skip":
                return Outcome(Status.SKIPPED, note=str(e))
            raise
        except ContainerMissingError:
            if not self._settings.azure.create_containers:
                raise
            # Deleted while the daemon ran: this transfer fails, the next creates it.
            self._azure.forget_container(spec.destination)
            raise PermanentError(
                f"{spec.destination}: container {spec.destination.container!r} was deleted "
                "during the copy; the next transfer into it creates it again"
            ) from None

    async def _container(self, spec: TransferSpec) -> None:
        """Create the destination's container if asked to (azure.create_containers),
        once per run; a dry run creates nothing."""
        if self._settings.azure.create_containers and not spec.options.dry_run:
            dst = spec.destination
            await retrying(
                lambda: self._azure.ensure_container(dst),
                self._settings.retry,
                f"create container {dst.container!r}",
            )

    async def _copy(
        self, spec: TransferSpec, listed: Listed | None, progress: Progress, known: Known | None
    ) -> Outcome:
        src = spec.source
        # A job's own addresses were checked when it was read; a prefix's children get
        # their names from S3 keys, which allow what blob names do not.
        problem = blob_name_problem(spec.destination.blob)
        if problem:
            raise PermanentError(f"{spec.destination}: {problem}")
        bs = self._settings.block_size
        info: ObjectInfo | None = None
        if listed is None:
            info = await self._head(src)
            fp = fingerprint(src, info.etag, info.size)
        else:
            # A listing gives ETag and size: enough to skip an unchanged object without
            # a single request to S3 for it.
            fp = fingerprint(src, listed.etag, listed.size)
        # A large object asks Azure itself: that HEAD is what times Azure for the pipe
        # decision, and beside its bytes it costs nothing.
        if listed is None or listed.size > bs:
            known = None
        skip = await self._skip_reason(spec, fp, known)
        if skip:
            return Outcome(Status.SKIPPED, note=skip)
        if spec.options.dry_run:
            return await self._dry_run(src, info, listed)
        # Server-side, even a small object goes as a block Azure fetches itself: its
        # properties come from a HEAD, as no GET passes through here.
        server_side = (spec.options.mode or self._settings.mode) == "server-side"
        if listed is not None and (listed.size > bs or (server_side and listed.size)):
            info = await self._head(src)
            fp = fingerprint(src, info.etag, info.size)  # the version actually copied
        if info is None:
            assert listed is not None
            # Small-object path: one GET whose headers stand in for the HEAD, one PUT.
            return await self._whole(
                listed.size, lambda: self._read_listed(listed, src), spec, fp, progress
            )
        if server_side and info.size:
            return await self._server_side(info, spec, fp, progress)
        if await self._pipes(info, spec):
            return await self._pipe(info, spec, fp, progress)
        return await self._streamed(info, spec, fp, progress)

    async def _dry_run(
        self, src: S3Address, info: ObjectInfo | None, listed: Listed | None
    ) -> Outcome:
        """What a copy would do, having asked what it asks before reading a byte: the
        destination (skipped as unchanged, or refused by overwrite 'never', above) and,
        for one object, or one in an archive class whose listing cannot say if it is
        restored, the source's HEAD (missing, denied or archived fail, or skip, as a
        copy would)."""
        if info is None:
            assert listed is not None
            if listed.storage_class not in ARCHIVE_CLASSES:
                return Outcome(Status.SKIPPED, note=DRY_RUN, would_copy=listed.size)
            info = await self._head(src)
        return Outcome(Status.SKIPPED, note=DRY_RUN, would_copy=info.size)

    async def _streamed(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, progress: Progress
    ) -> Outcome:
        """Through this host: a small object in one GET and one Put Blob, a larger one
        as blocks."""
        if info.size > self._settings.block_size:
            return await self._stream_blocks(info, spec, fp, progress)

        async def read() -> tuple[ObjectInfo, Chunks]:
            if not info.size:
                return info, Chunks()
            return info, await self._s3.read_range(info, 0, info.size)

        return await self._whole(info.size, read, spec, fp, progress)

    async def _pipes(self, info: ObjectInfo, spec: TransferSpec) -> bool:
        """Whether ``info`` goes as one GET piped into one Put Blob: a single-part
        object whose ETag is its MD5 (Azure checks the bytes against it), larger than a
        block and within pipe_max, on a link near enough that one stream runs at full
        speed. Farther away, parallel blocks are faster; and a block can resume."""
        s = self._settings
        if not (
            s.block_size < info.size <= s.pipe_max
            and info.md5 is not None
            and (spec.options.mode or s.mode) == "stream"
        ):
            return False
        near = s.pipe_rtt_ms / 1000
        # The HEAD just made is among S3's round trips; Azure's are timed on HEADs of the
        # destination, once a minute at most while objects keep coming.
        return await self._near(
            self._s3.round_trips, lambda: self._s3.head(info.address), near
        ) and await self._near(
            self._azure.round_trips, lambda: self._azure.existing(spec.destination), near
        )

    @staticmethod
    async def _near(
        trips: RoundTrips, probe: Callable[[], Awaitable[object]], within: float
    ) -> bool:
        """Whether a service answers within ``within`` s, asking ``probe`` (a HEAD) until
        its round trips tell: one late answer may be a busy moment, not a far link."""
        for _ in range(FAR_AFTER):
            verdict = trips.near(within)
            if verdict is not None:
                return verdict
            try:
                await probe()
            except NotPermittedError:
                pass  # refused, but answered: the round trip is timed all the same
            except TransferError:
                return False  # the block path reports the problem properly
        return trips.near(within) is True

    async def _pipe(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, progress: Progress
    ) -> Outcome:
        landing = self._landing(info, spec, fp)
        md5 = info.md5
        assert md5 is not None, "_pipes chose this route for an MD5 ETag only"
        overwrite = spec.overwrite is not Overwrite.NEVER
        dst = spec.destination
        damaged = 0

        async def once() -> bool:
            nonlocal damaged
            sent = 0
            # What went wrong on the S3 side while Azure was reading the body: aiohttp
            # reports it as a failed upload, this says what it was.
            source_error: list[Exception] = []

            async def body(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                nonlocal sent
                try:
                    async for chunk in chunks:
                        sent += len(chunk)
                        progress(len(chunk))
                        yield chunk
                except Exception as e:
                    source_error.append(e)
                    raise

            try:
                async with self._s3.open_object(info) as chunks:
                    await self._azure.put_stream(
                        dst,
                        body(chunks),
                        info.size,
                        md5,
                        landing.headers,
                        landing.metadata,
                        overwrite,
                        landing.tier,
                    )
                return True
            except BaseException as e:
                progress(-sent)  # nothing landed: a next try starts from the first byte
                if not isinstance(e, TransferError):
                    raise  # cancelled (a drain that ran out of time), or a bug
                if isinstance(e, CorruptBlockError):
                    damaged += 1
                raise (source_error[0] if source_error else e) from None

        # The stream's own buffers (aiohttp's, a few hundred KiB) count against the budget.
        async with self._budget.hold(PIPE_BUFFER):
            if await self._write(once, f"pipe {info.address} to {dst}", dst, fp, info.size) is None:
                progress(info.size)  # an earlier attempt landed it; only its answer was lost
        note = f"Azure found the bytes damaged {damaged} time(s); sent again" if damaged else None
        return Outcome(
            Status.COPIED,
            info.size,
            AZURE_CHECKED,
            note,
            landing=landing,
            route="pipe",
        )

    async def _read_listed(self, listed: Listed, src: S3Address) -> tuple[ObjectInfo, Chunks]:
        """A small listed object in one GET. A listing says nothing of encryption; the
        GET's headers do, and when they show an ETag that cannot prove the bytes (SSE-KMS,
        SSE-C), S3's checksums are asked for with one HEAD, as ``_head`` does for a key."""
        info, data = await self._s3.read_object(listed, src)
        if info.etag_is_md5 or not self._settings.verify:
            return info, data
        more = await self._s3.head(src, True)
        if more.etag != info.etag:
            raise SourceChangedError(str(src))
        info = dataclasses.replace(info, checksums=more.checksums, checksum_type=more.checksum_type)
        return info, data

    async def _head(self, src: S3Address) -> ObjectInfo:
        policy = self._settings.retry
        info = await retrying(lambda: self._s3.head(src), policy, f"HEAD {src}")
        info.raise_if_unreadable()
        if not info.etag_is_md5 and self._settings.verify:
            # Only now ask for S3's additional checksums: the ETag cannot prove the copy.
            info = await retrying(lambda: self._s3.head(src, True), policy, f"HEAD {src}")
        return info

    async def _skip_reason(self, spec: TransferSpec, fp: str, known: Known | None) -> str | None:
        if spec.overwrite is Overwrite.ALWAYS:
            return None
        dst = spec.destination
        try:
            existing = known.blob if known is not None else await self._existing(dst)
        except NotPermittedError:
            raise PermanentError(
                f"{dst}: overwrite '{spec.overwrite}' reads the blob first, and the "
                "credentials may not read (AuthorizationPermissionMismatch): grant read, "
                "or set overwrite 'always'"
            ) from None
        except ContainerMissingError:
            if not (spec.options.dry_run and self._settings.azure.create_containers):
                raise
            existing = None  # a copy would create the container: no blob is there
        if existing is None:
            return None
        if spec.overwrite is Overwrite.NEVER:
            return "destination exists and overwrite is 'never'"
        if existing.metadata.get(FINGERPRINT_KEY) == fp:
            return "unchanged: the blob already holds this version of the object"
        return None

    def _landing(self, info: ObjectInfo, spec: TransferSpec, fp: str) -> Landing:
        """Headers, metadata and tier for the blob, and what of the source's did not
        land as it was: metadata keys renamed, and values no Azure header can carry."""
        opts = spec.options
        headers = headers_of(info)
        if opts.content_type is not None:
            headers = dataclasses.replace(headers, content_type=opts.content_type)
        metadata, renamed = azure_metadata(info.metadata)
        metadata.update(opts.metadata)
        # S3 hands back whatever bytes an uploader put in a header (a UTF-8 file name in
        # Content-Disposition, say); Azure refuses them as a bad signature. The blob is
        # copied without them, and the report says which and what they held.
        dropped = {
            f.name: v
            for f in dataclasses.fields(headers)
            if (v := getattr(headers, f.name)) and not header_safe(v)
        }
        rewritten = {}
        if "content_disposition" in dropped:  # a UTF-8 file name: RFC 6266's filename*=
            ascii_value = ascii_disposition(dropped["content_disposition"])
            if ascii_value is not None and header_safe(ascii_value):
                rewritten["content_disposition"] = ascii_value
                del dropped["content_disposition"]
        headers = dataclasses.replace(headers, **dict.fromkeys(dropped), **rewritten)
        for key in [k for k, v in metadata.items() if not header_safe(v)]:
            dropped[f"metadata {key}"] = metadata.pop(key)
        metadata[FINGERPRINT_KEY] = fp
        metadata[ETAG_KEY] = info.etag.strip('"')
        tier = opts.tier or self._settings.azure.tiers.get(info.storage_class or "STANDARD")
        return Landing(headers, metadata, tier, renamed, dropped, rewritten)

    async def _whole(
        self,
        size: int,
        read: Callable[[], Awaitable[tuple[ObjectInfo, Chunks]]],
        spec: TransferSpec,
        fp: str,
        progress: Progress,
    ) -> Outcome:
        """One GET held here, one Put Blob, retried together: bytes that arrive damaged
        are read again. When S3's ETag is the object's MD5, it is the Put Blob's
        Content-MD5 and Azure checks the bytes against it, so nothing is hashed here.
        Otherwise the MD5 is computed here for Azure's check, and the bytes are proven
        against S3's ETag or checksum: small objects are always verified."""
        dst = spec.destination
        damaged = 0

        sent: tuple[ObjectInfo, str, Landing] | None = None  # the last attempt's

        async def once() -> tuple[ObjectInfo, str, Landing]:
            nonlocal damaged, sent
            info, data = await read()
            try:
                if info.md5 is not None:
                    md5, verified = info.md5, AZURE_CHECKED
                else:
                    md5 = await md5_off_loop(data)
                    checksum = Checksum.for_object(info)
                    if checksum is not None:
                        checksum.update(data)
                    try:
                        verified = verify(info, md5, [md5] if info.parts == 1 else None, checksum)
                    except VerificationError as e:
                        raise CorruptBlockError(str(e)) from None
                landing = self._landing(info, spec, fp)
                overwrite = spec.overwrite is not Overwrite.NEVER
                sent = (info, verified, landing)
                await self._azure.put(
                    dst, data, md5, landing.headers, landing.metadata, overwrite, landing.tier
                )
            except CorruptBlockError:
                damaged += 1
                raise
            return info, verified, landing

        async with self._budget.hold(size):
            done = await self._write(once, f"copy {spec.source}", dst, fp, size)
        if done is None:  # an earlier attempt landed it; only its answer was lost
            assert sent is not None, "only a put is refused as existing"
            done = sent
        info, verified, landing = done
        progress(info.size)
        note = (
            f"the bytes arrived damaged {damaged} time(s); read and sent again" if damaged else None
        )
        return Outcome(
            Status.COPIED,
            info.size,
            verified,
            note,
            landing=landing,
            route="whole",
        )

    async def _server_side(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, progress: Progress
    ) -> Outcome:
        """Azure fetches the object itself; where it cannot reach the bucket, the object
        streams through here and the report says why. That answer is remembered for the
        bucket a while, so a prefix of small objects does not ask it of every one."""
        seen = self._unreachable.get(info.bucket)
        if seen is not None and time.monotonic() - seen[0] < UNREACHABLE_FOR_S:
            code = seen[1]
        else:
            try:
                return await self._copy_server_side(info, spec, fp, progress)
            except SourceUnreachableError as e:
                code = e.code
                self._unreachable[info.bucket] = (time.monotonic(), code)
                log.warning("server-side copy impossible, streaming", code=code)
        note = (
            f"server-side copy impossible (Azure answered {code}: it cannot reach "
            "the source); streamed through this host instead"
        )
        outcome = await self._streamed(info, spec, fp, progress)
        outcome.note = f"{note}; {outcome.note}" if outcome.note else note
        return outcome

    async def _copy_server_side(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, progress: Progress
    ) -> Outcome:
        """Put Block From URL for every block: Azure reads S3, this host reads nothing."""
        policy = self._settings.retry
        dst = spec.destination
        cut = plan_blocks(info, self._settings.block_size, None, flavour="server-side")
        plan, done, cleared = await self._staged(
            cut, dst, lambda prefix: earlier_plan(prefix, cut, info, None, "server-side")
        )
        # An object in one block whose ETag is its MD5: Azure checks what it fetched.
        md5 = info.md5 if len(plan.blocks) == 1 else None
        lanes = asyncio.Semaphore(self._settings.block_concurrency)

        async def stage(block: Block) -> None:
            url = await self._source_urls(info)  # fresh for every request
            block_id = plan.block_id(block.index, SERVER_SIDE_MD5)
            await self._azure.stage_from_url(dst, block_id, url, block.start, block.length, md5)

        async def one(block: Block) -> None:
            try:
                what = f"stage {dst} block {block.index} from URL"
                await retrying(lambda: stage(block), policy, what)
                progress(block.length)
            finally:
                lanes.release()

        todo = [b for b in plan.blocks if b.index not in done]
        if done:
            progress(sum(b.length for b in plan.blocks if b.index in done), reused=True)
        interrupted = False
        try:
            async with asyncio.TaskGroup() as tg:
                for n, block in enumerate(todo):
                    # A lane before a task exists: however many blocks, no more than
                    # block_concurrency tasks, and a drain lets those in flight land.
                    await lanes.acquire()
                    if self._stopping.is_set():
                        lanes.release()
                        interrupted = True
                        break
                    if n == 0:
                        await one(block)  # alone: if Azure cannot reach S3, nothing else goes
                    else:
                        tg.create_task(one(block))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        if interrupted:
            raise Interrupted()  # the blocks in flight have landed; the rest go next start
        if md5 is None and info.version_id is None:
            # Each block was fetched from whatever version S3 held then (no If-Match can
            # go with Azure's GETs; a versioned object's URLs name its version): an
            # object written over at the same size would commit as a mix of both.
            await self._still_the_same(info)
        ids = [plan.block_id(b.index, SERVER_SIDE_MD5) for b in plan.blocks]
        landing = await self._commit(info, spec, fp, ids, md5)
        return Outcome(
            Status.COPIED,
            info.size,
            SERVER_SIDE_CHECKED
            if md5
            else "size: server-side copy, the bytes went from S3 to Azure without passing here",
            cleared,
            landing=landing,
            blocks_reused=len(done),
            route="server-side",
        )

    async def _still_the_same(self, info: ObjectInfo) -> None:
        """SourceChangedError unless S3 still holds the version ``info`` describes."""
        src = info.address
        now = await retrying(lambda: self._s3.head(src), self._settings.retry, f"HEAD {src}")
        if (now.etag, now.size) != (info.etag, info.size):
            raise SourceChangedError(str(info.address))

    async def _staged(
        self, plan: Plan, dst: AzAddress, earlier: Callable[[str], Plan | None]
    ) -> tuple[Plan, dict[int, bytes], str | None]:
        """The plan to go on with and its blocks already on the destination, from
        Azure's own record: {index: MD5 carried in the block ID}, for IDs of the right
        size only; and a note when blocks another writer left had to be discarded first,
        or when an earlier run's layout was taken up. ``plan`` is this run's layout;
        ``earlier`` names the layout of another prefix of this object's (see
        ``earlier_plan``): the one holding the most bytes is gone on with, so a change of
        block_size_mb between two runs of a transfer of hundreds of GB does not start it
        again from nothing."""
        policy = self._settings.retry
        try:
            staged = await retrying(lambda: self._azure.staged_blocks(dst), policy, f"blocks {dst}")
        except NotPermittedError:
            # A write-only SAS (create and write: the least an upload needs) may not
            # list blocks. The transfer goes on, staging every block; it cannot resume.
            log.warning("no permission to list staged blocks: every block is sent")
            return plan, {}, None
        # Azure takes block IDs of one length per blob: an upload another tool left
        # unfinished (its IDs of another length) refuses every block of ours as
        # InvalidBlobOrBlock for the 7 days its blocks live.
        foreign = sum(_sent_length(i) != _SENT_LENGTH for i in staged)
        if foreign:
            if await self._existing(dst):
                raise PermanentError(
                    f"{dst}: {foreign} uncommitted block(s) another tool left on this blob "
                    "have IDs of another length, and Azure takes no block of ours beside "
                    "them; they go when that tool commits or 7 days after its last block; "
                    "or copy to another name"
                )
            # Nothing is committed: deleting the blob deletes only those blocks.
            await retrying(lambda: self._azure.discard_uncommitted(dst), policy, f"clear {dst}")
            log.warning("discarded uncommitted blocks another tool left", blocks=foreign)
            note = f"discarded {foreign} uncommitted block(s) another tool had left on the blob"
            return plan, {}, note
        plans = [plan]
        for prefix in sorted({i[:24] for i in staged if len(i) == _ID_LENGTH} - {plan.id_prefix}):
            other = earlier(prefix)
            if other is not None:
                plans.append(other)
        held = [_held(p, staged) for p in plans]
        # The most bytes held wins; on a tie (nothing held, say), this run's own layout.
        k = max(range(len(plans)), key=lambda j: sum(plans[j].blocks[i].length for i in held[j]))
        if k == 0:
            return plan, held[0], None
        chosen = plans[k]
        log.info(
            "resuming in an earlier run's layout",
            block_mib=chosen.block_size // MiB,
            blocks_held=len(held[k]),
        )
        if chosen.block_size == plan.block_size:
            return chosen, held[k], None  # staged by an earlier blobferry, same layout
        note = (
            f"resumed in the {chosen.block_size // MiB} MiB blocks an earlier run staged "
            f"({len(held[k])} held), not the {plan.block_size // MiB} MiB this run would "
            "cut: block_size_mb changed in between"
        )
        return chosen, held[k], note

    async def _stream_blocks(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, progress: Progress
    ) -> Outcome:
        policy = self._settings.retry
        dst = spec.destination
        part_sizes = (
            await retrying(lambda: self._s3.part_sizes(info), policy, f"part sizes {info.address}")
            if info.parts
            else None
        )
        cut = plan_blocks(info, self._settings.block_size, part_sizes)
        plan, staged, cleared = await self._staged(
            cut, dst, lambda prefix: earlier_plan(prefix, cut, info, part_sizes, "stream")
        )
        md5s: list[bytes | None] = [staged.get(b.index) for b in plan.blocks]
        reused = sum(m is not None for m in md5s)
        todo = [b for b in plan.blocks if md5s[b.index] is None]
        if reused:
            progress(sum(b.length for b in plan.blocks) - sum(b.length for b in todo), reused=True)
        checksum = Checksum.for_object(info)
        # The in-order pass over the bytes gives the whole object's MD5 (the blob's
        # Content-MD5, and the proof of a single-part object), the MD5 of a part cut into
        # several blocks, and S3's checksum. Where each part is one block (the common
        # multipart case) the block MD5s Azure checks are the part MD5s: they prove the
        # copy alone, so without content_md5 each byte is hashed once and no block waits
        # for another. A full in-order pass is only possible when every block passes
        # through here.
        one_pass = plan.parts == len(plan.blocks) and checksum is None
        wanted = self._settings.content_md5 or not one_pass
        digest = (
            _InOrderDigest(plan, checksum)
            if not reused and self._settings.verify and wanted
            else None
        )
        await self._stage_all(info, dst, plan, todo, md5s, digest, progress)
        note = None
        try:
            verified, md5 = self._proof(info, plan, md5s, digest, reused)
        except VerificationError as e:
            if reused and not one_pass:
                raise  # the object's MD5 cannot be had without every block
            # Something was damaged between S3 and us (Azure checked the rest). Read the
            # whole object once more; only blocks whose bytes differ are staged again.
            log.warning("verification failed, reading again", error=str(e))
            first = list(md5s)
            if digest is not None:  # a fresh one: a checksum's state cannot be rewound
                digest = _InOrderDigest(plan, Checksum.for_object(info))
            await self._stage_all(
                info, dst, plan, list(plan.blocks), md5s, digest, _unwatched, first
            )
            damaged = sum(a != b for a, b in zip(first, md5s, strict=True))
            verified, md5 = self._proof(info, plan, md5s, digest, reused)
            note = f"{damaged} block(s) arrived damaged from S3 and were read again"
        note = "; ".join(n for n in (cleared, note) if n) or None
        ids = [plan.block_id(b.index, m) for b, m in zip(plan.blocks, md5s, strict=True)]
        landing = await self._commit(info, spec, fp, ids, md5)
        return Outcome(
            Status.COPIED,
            info.size,
            verified,
            note,
            landing=landing,
            blocks_reused=reused,
            route="blocks",
        )

    async def _commit(
        self, info: ObjectInfo, spec: TransferSpec, fp: str, ids: list[str], md5: bytes | None
    ) -> Landing:
        """Commit the block list with the source's properties; returns how it landed."""
        landing = self._landing(info, spec, fp)
        overwrite = spec.overwrite is not Overwrite.NEVER
        dst = spec.destination
        await self._write(
            lambda: self._azure.commit(
                dst, ids, md5, landing.headers, landing.metadata, overwrite, landing.tier
            ),
            f"commit {dst}",
            dst,
            fp,
            info.size,
        )
        return landing

    async def _existing(self, dst: AzAddress) -> ExistingBlob | None:
        return await retrying(
            lambda: self._azure.existing(dst), self._settings.retry, f"check {dst}"
        )

    async def _write(
        self, once: Callable[[], Awaitable[T]], what: str, dst: AzAddress, fp: str, size: int
    ) -> T | None:
        """``once`` retried; None when a retry under 'never' was refused because an
        earlier attempt had landed this very copy and only its answer was lost."""
        try:
            return await retrying(once, self._settings.retry, what)
        except DestinationExistsError:
            if not await self._ours_already(dst, fp, size):
                raise
            return None

    async def _ours_already(self, dst: AzAddress, fp: str, size: int) -> bool:
        """After a write on condition of absence ('never') was refused: whether the blob
        there is this very copy, committed by an earlier attempt whose answer was lost
        (a reset after Azure had done the work), so the retry found it in the way."""
        existing = await self._existing(dst)
        if existing is None or existing.size != size:
            return False
        if existing.metadata.get(FINGERPRINT_KEY) != fp:
            return False
        log.warning("the blob had landed already: an attempt's answer was lost")
        return True

    @staticmethod
    def _proof(
        info: ObjectInfo,
        plan: Plan,
        md5s: list[bytes | None],
        digest: _InOrderDigest | None,
        reused: int,
    ) -> tuple[str, bytes | None]:
        """How the staged blocks prove the copy, and the blob's Content-MD5 if known."""
        if digest is not None:
            whole = digest.whole.digest()
            return verify(info, whole, digest.part_digests, digest.checksum), whole
        if plan.parts and plan.parts == len(plan.blocks):
            # One block per part: the part MD5s are the block MD5s, from the block IDs.
            return verify(info, None, [m for m in md5s if m is not None]), None
        if reused:
            why = (
                f"{reused} blocks were staged by an earlier run, so the object's MD5 "
                "could not be computed in this one"
            )
        else:
            why = "verification is off (verify = false)"
        return f"size: {why}", None

    async def _stage_all(
        self,
        info: ObjectInfo,
        dst: AzAddress,
        plan: Plan,
        todo: list[Block],
        md5s: list[bytes | None],
        digest: _InOrderDigest | None,
        progress: Progress,
        known: list[bytes | None] | None = None,
    ) -> None:
        """Read, stage and digest ``todo``, filling ``md5s``. With ``known`` (a repair
        pass), a block whose MD5 matches the one already staged is not sent again."""
        lanes = asyncio.Semaphore(self._settings.block_concurrency)
        interrupted = False
        try:
            async with asyncio.TaskGroup() as tg:
                for block in todo:
                    # Back-pressure here, before a task exists: a huge object never has
                    # more than block_concurrency tasks or its budget share in flight.
                    await lanes.acquire()
                    try:
                        await self._budget.acquire(block.length)
                    except BaseException:
                        lanes.release()
                        raise
                    if self._stopping.is_set():
                        self._block_done(block.length, lanes)
                        interrupted = True
                        break
                    task = tg.create_task(
                        self._one_block(
                            info,
                            dst,
                            plan,
                            block,
                            md5s,
                            digest,
                            progress,
                            known[block.index] if known else None,
                        )
                    )
                    # Given back when the task ends however it ends: a task cancelled
                    # before its first step (a job cancelled) never runs a finally.
                    task.add_done_callback(partial(self._block_done, block.length, lanes))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        if interrupted:
            # The blocks in flight have landed; the rest are read on the next start.
            raise Interrupted()

    async def _one_block(
        self,
        info: ObjectInfo,
        dst: AzAddress,
        plan: Plan,
        block: Block,
        md5s: list[bytes | None],
        digest: _InOrderDigest | None,
        progress: Progress,
        known: bytes | None,
    ) -> None:
        data = await retrying(
            lambda: self._s3.read_range(info, block.start, block.length),
            self._settings.retry,
            f"read {info.address} block {block.index}",
        )
        md5 = await md5_off_loop(data)
        block_id = plan.block_id(block.index, md5)
        async with asyncio.TaskGroup() as both:
            if md5 != known:
                both.create_task(
                    retrying(
                        lambda: self._azure.stage(dst, block_id, data, md5),
                        self._settings.retry,
                        f"stage {dst} block {block.index}",
                    )
                )
            if digest is not None:
                both.create_task(digest.feed(block, data, md5))
        md5s[block.index] = md5
        progress(block.length)

    def _block_done(self, n: int, lanes: asyncio.Semaphore, _: object = None) -> None:
        """A block's budget share and lane, given back (its task's done callback)."""
        self._budget.release(n)
        lanes.release()


def _first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that sank a group of block tasks; the rest were cancelled because of it."""
    errors = [e for e in _leaves(eg) if not isinstance(e, asyncio.CancelledError)]
    for kind in (PermanentError, TransferError, RetryableError):
        for e in errors:
            if isinstance(e, kind):
                return e
    return errors[0] if errors else asyncio.CancelledError()


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]
