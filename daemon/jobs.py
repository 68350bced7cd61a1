"""The job model: transfer specs, their options, and job-file parsing.

A job file is ``{"source": ..., "destination": ...}`` or ``{"transfers": [...]}``.
Parsing is strict (unknown fields are errors) because a typo in a field name that
silently falls back to a default is the kind of mistake that costs a day.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.addresses import (
    AzAddress,
    S3Address,
    header_safe,
    parse_azure,
    parse_s3,
)
from daemon.errors import AddressError, JobFileError
from daemon.jsonscan import LazyArray, scan_object


class Overwrite(StrEnum):
    ALWAYS = "always"
    NEVER = "never"
    IF_CHANGED = "if-changed"  # skip a blob whose recorded source fingerprint still matches


TIERS = ("Hot", "Cool", "Cold", "Archive")
Tier = Literal["Hot", "Cool", "Cold", "Archive"]
Mode = Literal["stream", "server-side"]
_METADATA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """Which keys under a prefix are copied: those matching an ``include`` pattern (all,
    when there is none) and no ``exclude`` pattern, as rclone's and AzCopy's filters
    choose. Patterns are globs on the key below the prefix: ``*`` and ``?`` stay within
    one ``/``-separated segment, ``**`` crosses them, ``[abc]`` and ``[!abc]`` are sets.
    A pattern without ``/`` matches the last segment (the file name) at any depth; one
    with ``/`` matches the whole key below the prefix (a leading ``/`` is dropped)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    _include: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _exclude: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, include: Sequence[str], exclude: Sequence[str]) -> KeyFilter:
        return cls(
            tuple(include),
            tuple(exclude),
            tuple(map(glob, include)),
            tuple(map(glob, exclude)),
        )

    def admits(self, rest: str) -> bool:
        """Whether the key ``rest`` (below the prefix) is copied."""
        if self._include and not any(p.fullmatch(rest) for p in self._include):
            return False
        return not any(p.fullmatch(rest) for p in self._exclude)


def glob(pattern: str) -> re.Pattern[str]:
    """``pattern`` (see KeyFilter) as a regular expression; ValueError if malformed."""
    if not pattern or pattern in ("/", "**/"):
        raise ValueError(f"pattern {pattern!r} matches nothing or everything; leave it out")
    anchored = "/" in pattern
    p = pattern.removeprefix("/")
    out = [] if anchored else ["(?:.*/)?"]
    i = 0
    while i < len(p):
        c = p[i]
        if p.startswith("**/", i):
            out.append("(?:.*/)?")  # any number of folders, none included
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = p.find("]", i + 2 if p[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise ValueError(f"pattern {pattern!r} opens a [set] it does not close")
            body = p[i + 1 : end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Options:
    """What a job may say about how objects land, beyond where, and (for a prefix)
    which of its objects."""

    overwrite: Overwrite = Overwrite.IF_CHANGED
    metadata: Mapping[str, str] = field(default_factory=dict)  # merged over the source's
    content_type: str | None = None  # replaces the source's
    tier: Tier | None = None  # otherwise the storage-class map in settings, or the default
    mode: Mode | None = None  # otherwise the mode setting
    keys: KeyFilter | None = None  # a prefix's objects to copy; None: every one
    dry_run: bool = False  # decide what would be copied, and copy nothing
    # The blob follows S3 both ways: copied while the object exists, deleted once S3
    # no longer holds it (and only if blobferry copied it from this very key).
    delete: bool = False

    def doc(self) -> dict[str, Any]:
        """These options as a job file gives them (include and exclude left out: they
        chose among a prefix's keys, and a job of single objects has none)."""
        out: dict[str, Any] = {"overwrite": str(self.overwrite)}
        for name in ("content_type", "tier", "mode"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.dry_run:
            out["dry_run"] = True
        if self.delete:
            out["delete"] = True
        return out


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One source address (an object or a prefix), where it goes, and how."""

    source: S3Address
    destination: AzAddress
    options: Options = Options()

    @property
    def overwrite(self) -> Overwrite:
        return self.options.overwrite

    def for_key(self, key: str) -> TransferSpec:
        """The spec of one object found under a prefix source."""
        rest = key[len(self.source.key) :]
        return TransferSpec(
            self.source.child(key),
            self.destination.child(self.destination.blob + rest),
            self.options,
        )


def _header_value(what: str, value: str) -> None:
    """A value a job gives that Azure would refuse is an error when the job is read, not
    a property quietly left off the blob."""
    if not header_safe(value):
        raise ValueError(f"{what} must be printable ASCII (Azure takes no other), not {value!r}")


class OptionsIn(BaseModel):
    """The options a job (or a route in the settings) may give."""

    model_config = ConfigDict(extra="forbid", strict=True)

    overwrite: Literal["always", "never", "if-changed"] | None = None
    metadata: dict[str, str] | None = None
    content_type: str | None = None
    tier: Tier | None = None
    mode: Mode | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    dry_run: bool | None = None
    delete: bool | None = None

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or ():
            glob(pattern)  # raises ValueError saying what is wrong with it
        return v

    @field_validator("metadata")
    @classmethod
    def _names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, value in (v or {}).items():
            if not _METADATA_NAME.match(name) or name.lower().startswith("blobferry_"):
                raise ValueError(
                    f"metadata name {name!r} must be a C# identifier (letters, digits, _) "
                    "and not start with blobferry_"
                )
            _header_value(f"metadata {name!r}", value)
        return v

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, v: str | None) -> str | None:
        if v is not None:
            _header_value("content_type", v)
        return v

    def over(self, base: Options) -> Options:
        """These options, falling back to ``base`` where not given."""
        return Options(
            overwrite=Overwrite(self.overwrite) if self.overwrite else base.overwrite,
            metadata={**base.metadata, **(self.metadata or {})},
            content_type=self.content_type if self.content_type is not None else base.content_type,
            tier=self.tier or base.tier,
            mode=self.mode or base.mode,
            keys=self._keys(base.keys),
            dry_run=self.dry_run if self.dry_run is not None else base.dry_run,
            delete=self.delete if self.delete is not None else base.delete,
        )

    def _keys(self, base: KeyFilter | None) -> KeyFilter | None:
        """A transfer's own include (or exclude) list replaces the job's."""
        if self.include is None and self.exclude is None:
            return base
        include = self.include if self.include is not None else (base.include if base else ())
        exclude = self.exclude if self.exclude is not None else (base.exclude if base else ())
        return KeyFilter.of(include, exclude) if include or exclude else None


class _TransferIn(OptionsIn):
    source: str
    destination: str


class _JobIn(OptionsIn):
    """Either one transfer (source, destination) or a list; options at the top level
    apply to every transfer, and a transfer's own options win."""

    source: str | None = None
    destination: str | None = None
    # Items are validated one by one in parse_job, straight into compact specs: a job
    # of 100,000 transfers never exists as 100,000 pydantic models at once.
    transfers: Annotated[list[Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> _JobIn:
        single = self.source is not None or self.destination is not None
        if single and self.transfers is not None:
            raise ValueError("give either source/destination or transfers, not both")
        if not single and self.transfers is None:
            raise ValueError("a job needs source and destination, or a transfers list")
        if single and (self.source is None or self.destination is None):
            raise ValueError("a job needs both source and destination")
        return self


def make_spec(source: str, destination: str, options: Options | None = None) -> TransferSpec:
    src = parse_s3(source)
    dst = parse_azure(destination)
    if src.is_prefix and not dst.is_prefix:
        raise AddressError(
            destination, "the source is a prefix (ends with /), so the destination must be one too"
        )
    if not src.is_prefix and dst.is_prefix:
        # Copying one object "into" a folder keeps its name, as cp does.
        dst = dst.child(dst.blob + src.key.rsplit("/", 1)[-1])
    return TransferSpec(src, dst, options or Options())


def parse_job(raw: bytes | str) -> Sequence[TransferSpec]:
    """Parse a job file's text into transfer specs, or raise JobFileError saying why.

    Every transfer is checked here, before any runs; the specs of a transfers list are
    then made one at a time as they are walked (see JobTransfers), so a job of 300,000
    transfers costs about its text in memory, not a tree of dicts and specs."""
    try:
        data, items = scan_object(raw, "transfers")
    except RecursionError:
        raise JobFileError("job file is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JobFileError(f"job file is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise JobFileError("job file must hold a JSON object")
    if items is not None:  # a stand-in of the same emptiness, for the model's checks
        data["transfers"] = [None] if len(items) else []
    try:
        job = _JobIn.model_validate(data)
    except ValidationError as e:
        raise JobFileError(f"job file: {_first_problem(e)}") from None
    defaults = job.over(Options())
    if job.transfers is None:
        assert job.source is not None and job.destination is not None
        spec = make_spec(job.source, job.destination, defaults)
        _filters_a_prefix(spec, "job file")
        return [spec]
    assert items is not None  # "transfers" was given, and the model took it as a list
    transfers = JobTransfers(items, defaults)
    transfers.check()
    return transfers


class JobTransfers(Sequence[TransferSpec]):
    """A job file's transfers, each spec made from its item when it is wanted."""

    def __init__(self, items: LazyArray, defaults: Options) -> None:
        self._items = items
        self._defaults = defaults

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> TransferSpec: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[TransferSpec]: ...
    def __getitem__(self, i: int | slice) -> TransferSpec | Sequence[TransferSpec]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._spec(i, self._items[i])

    def __iter__(self) -> Iterator[TransferSpec]:
        for i, item in enumerate(self._items):
            yield self._spec(i, item)

    def _spec(self, i: int, item: Any) -> TransferSpec:
        try:
            t = _TransferIn.model_validate(item)
            own = t.model_fields_set - {"source", "destination"}
            spec = make_spec(
                t.source, t.destination, t.over(self._defaults) if own else self._defaults
            )
        except ValidationError as e:
            raise JobFileError(f"job file: transfers.{i}.{_first_problem(e)}") from None
        except AddressError as e:
            raise JobFileError(f"job file: transfers.{i}: {e}") from None
        if t.include is not None or t.exclude is not None or spec.options.delete:
            _filters_a_prefix(spec, f"job file: transfers.{i}")
        return spec

    def check(self) -> None:
        """Every transfer valid, and no blob written by two: JobFileError otherwise.

        A daemon writes one account, so a container and a blob name are one blob
        however the address spells the account (az://, or its https:// URL). Seen
        blobs are kept as hashes; a hash seen twice is checked by name."""
        seen: set[int] = set()
        for i, spec in enumerate(self):
            if spec.source.is_prefix:
                continue
            dst = spec.destination
            h = hash((dst.container, dst.blob))
            if h not in seen:
                seen.add(h)
                continue
            for j, earlier in enumerate(itertools.islice(self, i)):
                d = earlier.destination
                if not earlier.source.is_prefix and (d.container, d.blob) == (
                    dst.container,
                    dst.blob,
                ):
                    raise JobFileError(
                        f"job file: transfers.{j} and transfers.{i} both write "
                        f"{spec.destination}; a blob holds one object"
                    )


def _filters_a_prefix(spec: TransferSpec, where: str) -> None:
    """include/exclude choose among a prefix's objects: given for one object, they
    would either copy it anyway or silently copy nothing. delete is the reverse: it
    says what to do when one object is gone, and a prefix's gone objects are not listed."""
    if spec.options.keys is not None and not spec.source.is_prefix:
        raise JobFileError(
            f"{where}: include and exclude choose objects under a prefix, and "
            f"{spec.source} is one object (a prefix ends with /)"
        )
    if spec.options.delete and spec.source.is_prefix:
        raise JobFileError(
            f"{where}: delete follows one object (its blob goes once S3 no longer holds "
            f"it), and {spec.source} is a prefix"
        )


def _first_problem(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{where}: {msg}" if where else msg
