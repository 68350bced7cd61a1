"""Routes: which destination an S3 event's key goes to, and how, from the settings'
``[[routes]]``. An event names a bucket and a key, never a destination; a route
names both ends, with the job options its copies take.

    [[routes]]
    source = "s3://bucket/incoming/"
    destination = "az://container/incoming/"
    tier = "Cool"
    delete = true

The longest source prefix that holds a key is its route. A key no route holds is not
guessed at: its message is refused (and dead-lettered by the queue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import field_validator

from daemon.addresses import AzAddress, S3Address, parse_azure, parse_s3
from daemon.errors import AddressError
from daemon.jobs import Options, OptionsIn


class RouteIn(OptionsIn):
    """One ``[[routes]]`` table: a source prefix, a destination prefix, and options."""

    source: str
    destination: str

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("s3://") and "/" not in v[5:]:
            v += "/"  # the whole bucket
        return _prefix(v, parse_s3, "source")

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        if v.startswith("az://") and "/" not in v[5:]:
            v += "/"  # the whole container
        return _prefix(v, parse_azure, "destination")


def _prefix(v: str, parse: Callable[[str], S3Address | AzAddress], end: str) -> str:
    try:
        address = parse(v)
    except AddressError as e:
        raise ValueError(str(e)) from None
    if not address.is_prefix:
        raise ValueError(f"{v!r}: a route's {end} is a prefix, and ends with /")
    return v


@dataclass(frozen=True, slots=True)
class Route:
    source: S3Address
    destination: AzAddress
    options: Options

    def place(self, key: str) -> AzAddress:
        """Where the object ``key`` (under this route's source) lands."""
        return self.destination.child(self.destination.blob + key[len(self.source.key) :])

    def admits(self, key: str) -> bool:
        keys = self.options.keys
        return keys is None or keys.admits(key[len(self.source.key) :])


class Routes:
    def __init__(self, tables: list[RouteIn]) -> None:
        routes = [
            Route(parse_s3(t.source), parse_azure(t.destination), t.over(Options()))
            for t in tables  # each checked as the settings were loaded
        ]
        # Longest prefix first: the most particular route wins.
        self._routes = sorted(routes, key=lambda r: -len(str(r.source)))

    def __bool__(self) -> bool:
        return bool(self._routes)

    def find(self, bucket: str, key: str) -> Route | None:
        for r in self._routes:
            if r.source.bucket == bucket and key.startswith(r.source.key):
                return r
        return None
