"""A JSON object one of whose members, an array, is read an item at a time.

``json.loads`` of a 16 MiB job file of short transfers builds some 150 MiB of dicts and
strings at once, and the specs made from them as much again. A job's transfers are
only ever walked in order, so their array stays text: the offset of each item is
kept, and the item decoded when it is wanted. Errors are json's own (JSONDecodeError
with its line and column), as ``json.loads`` would raise them.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator
from typing import Any

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class LazyArray:
    """The items of a JSON array, decoded one at a time from the text holding them."""

    def __init__(self, text: str, offsets: array[int]) -> None:
        self._text = text
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:
        return _DECODER.raw_decode(self._text, self._offsets[i])[0]

    def __iter__(self) -> Iterator[Any]:
        text = self._text
        for offset in self._offsets:
            yield _DECODER.raw_decode(text, offset)[0]


def _skip(text: str, i: int) -> int:
    m = _WS.match(text, i)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def scan_object(raw: bytes | str, lazy: str) -> tuple[Any, LazyArray | None]:
    """The top-level value of ``raw``; if it is an object whose member ``lazy`` is an
    array, that array comes apart as a LazyArray (its member in the dict is None)."""
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return json.loads(text), None  # not an object: the caller says so
    members: dict[str, Any] = {}
    items: LazyArray | None = None
    i = _skip(text, i + 1)
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                raise json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", text, i
                )
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if not text.startswith(":", i):
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _skip(text, i + 1)
            if key == lazy and text.startswith("[", i):
                items, i = _scan_array(text, i)
                members[key] = None
            else:
                members[key], i = _DECODER.raw_decode(text, i)
                if key == lazy:
                    items = None  # a later member of the same name wins, as in json.loads
            i = _skip(text, i)
            if text.startswith(",", i):
                i = _skip(text, i + 1)
                continue
            if text.startswith("}", i):
                i += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if _skip(text, i) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, i))
    return members, items


def _scan_array(text: str, i: int) -> tuple[LazyArray, int]:
    """The array starting at ``i``, each item decoded once to find its end and let go."""
    offsets = array("Q")
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return LazyArray(text, offsets), i + 1
    while True:
        offsets.append(i)
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text.startswith(",", i):
            i = _skip(text, i + 1)
            continue
        if text.startswith("]", i):
            return LazyArray(text, offsets), i + 1
        raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
