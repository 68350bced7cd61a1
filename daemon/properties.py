"""What a blob carries besides its bytes: its HTTP properties, its metadata (S3's keys
renamed as Azure takes them), its tier, and the fingerprint of the source version it
was copied from, by which a later run knows the blob is already this version.

Azure refuses any header value that is not printable ASCII, and metadata names that
are not C# identifiers; S3 keeps whatever an uploader sent. What cannot land as it was
is rewritten (a UTF-8 file name as RFC 6266's ``filename*=``) or left off, and the
report says which (``Landing``).
"""

from __future__ import annotations

import base64
import dataclasses
import email.message
import email.utils
import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from azure.storage.blob import ContentSettings

from daemon.addresses import S3Address, header_safe
from daemon.jobs import TransferSpec
from daemon.objects import ObjectInfo

FINGERPRINT_KEY = "blobferry_fingerprint"
ETAG_KEY = "blobferry_source_etag"
_DEFAULT_TYPE = "application/octet-stream"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# RFC 8187's attr-char: what an ext-value may carry as it is; the rest is %-encoded.
_ATTR_CHARS = "!#$&+-.^_`|~"


@dataclass(frozen=True, slots=True)
class BlobHeaders:
    """The HTTP properties a blob carries, taken from the source object."""

    content_type: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_disposition: str | None = None
    cache_control: str | None = None

    def settings(self, md5: bytes | None) -> ContentSettings:
        """As the SDK takes them (commit, and the SDK's Put Blob)."""
        return ContentSettings(
            content_type=self.content_type or _DEFAULT_TYPE,
            content_encoding=self.content_encoding,
            content_language=self.content_language,
            content_disposition=self.content_disposition,
            cache_control=self.cache_control,
            content_md5=bytearray(md5) if md5 is not None else None,
        )

    def headers(self, md5: bytes | None) -> dict[str, str]:
        """As Put Blob's ``x-ms-blob-*`` headers (the direct path)."""
        out = {"x-ms-blob-content-type": self.content_type or _DEFAULT_TYPE}
        for name, value in (
            ("x-ms-blob-content-encoding", self.content_encoding),
            ("x-ms-blob-content-language", self.content_language),
            ("x-ms-blob-content-disposition", self.content_disposition),
            ("x-ms-blob-cache-control", self.cache_control),
            ("x-ms-blob-content-md5", base64.b64encode(md5).decode() if md5 else None),
        ):
            if value is not None:
                out[name] = value
        return out


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


def landing(info: ObjectInfo, spec: TransferSpec, fp: str, tiers: Mapping[str, str]) -> Landing:
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
    tier = opts.tier or tiers.get(info.storage_class or "STANDARD")
    return Landing(headers, metadata, tier, renamed, dropped, rewritten)


def azure_metadata(metadata: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """S3 metadata keys as valid Azure names (C# identifiers).

    The rule: every character that is not a letter, digit or underscore becomes ``_``;
    a key that starts with a digit gets a leading ``_``; a key that then collides with
    another gets ``_2``, ``_3`` ... Returns the metadata and {original: renamed}.
    """
    out: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for key in sorted(metadata):
        name = key if _IDENTIFIER.match(key) else re.sub(r"[^A-Za-z0-9_]", "_", key)
        if name[:1].isdigit() or not name:
            name = "_" + name
        base, n = name, 1
        while name.lower() in (k.lower() for k in out):
            n += 1
            name = f"{base}_{n}"
        if name != key:
            renamed[key] = name
        out[name] = metadata[key]
    return out, renamed


def ascii_disposition(value: str) -> str | None:
    """A Content-Disposition holding non-ASCII (an uploader's file name in UTF-8) as
    RFC 6266 writes it for HTTP: each such parameter as ``name*=UTF-8''%XX...``, a file
    name also as an ASCII ``filename=`` for clients that know no better. Azure refuses
    non-ASCII in a header; this keeps the value, file name and all. None when
    ``value`` has no disposition type to keep.

    HTTP reads header bytes as Latin-1: UTF-8 arrives as mojibake ("cafÃ©") and is
    decoded back; a value that is not UTF-8 underneath is the Latin-1 it reads as."""
    try:
        text = value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        text = value
    kind, _, rest = text.partition(";")
    kind = kind.strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&+.^_`|~-]+", kind):
        return None
    message = email.message.Message()
    message["Content-Disposition"] = "x" + (";" + rest if rest else "")
    params: dict[str, str] = {}
    found: Sequence[tuple[str, object]] = message.get_params([], header="content-disposition")
    for key, raw in found[1:]:
        if isinstance(raw, tuple):  # key*=charset''value (RFC 2231): it wins
            params[key.lower()] = email.utils.collapse_rfc2231_value(cast(Any, raw))
        else:
            params.setdefault(key.lower(), email.utils.unquote(str(raw)))
    out = [kind]
    for key, v in params.items():
        if v.isascii() and v.isprintable():
            out.append(f"{key}={_quoted(v)}")
            continue
        if key == "filename":  # the plain one first: a client takes the last it knows
            plain = unicodedata.normalize("NFKD", v).encode("ascii", "ignore").decode()
            out.append(f"filename={_quoted(''.join(c if c.isprintable() else '_' for c in plain))}")
        out.append(f"{key}*=UTF-8''{quote(v, safe=_ATTR_CHARS)}")
    return "; ".join(out)


def _quoted(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
