"""Single objects and prefixes, copied by the engine against moto and Azurite."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon import app
from daemon.addresses import S3Address
from daemon.azure import AzureWriter
from daemon.budget import Budget
from daemon.errors import Interrupted
from daemon.jobs import parse_job
from daemon.layout import sent_length
from daemon.objects import ObjectInfo
from daemon.s3 import S3Reader
from daemon.settings import Settings
from daemon.state import StateStore
from daemon.supervisor import Supervisor
from daemon.transfer import Copier
from daemon.verify import AZURE_CHECKED
from tests.conftest import make_settings
from tests.helpers import (
    MiB,
    blob_bytes,
    blob_names,
    copy,
    gz,
    multipart_object,
    payload,
    random_bytes,
    s3_bytes,
)
from tests.proxy import FaultProxy, Faults
from tests.test_faults import through
from tests.test_server_side import _azurite_url


@pytest.mark.parametrize(
    "size",
    [0, 1024, 4 * MiB, 4 * MiB + 1, 3 * 4 * MiB + 12345],
    ids=["empty", "1KiB", "one-block", "one-block-plus-one", "several-blocks"],
)
async def test_single_object_sizes(
    size: int,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    assert settings.block_size == 4 * MiB  # the default the sizes above are cut around
    data = payload(size, seed=size)
    s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=data)
    status, [row] = await copy(settings, f"s3://{bucket}/obj.bin", f"az://{container}/obj.bin")
    assert status == "done", row.error
    assert (row.status, row.bytes_done) == ("copied", size)
    whole = size <= settings.block_size
    assert row.detail["route"] == ("whole" if whole else "blocks")
    assert row.detail["verified"] == (AZURE_CHECKED if whole else "etag")
    assert blob_bytes(blob_service, container, "obj.bin") == data
    props = blob_service.get_blob_client(container, "obj.bin").get_blob_properties()
    assert props.blob_type == "BlockBlob" and props.size == size
    stored = props.content_settings.content_md5
    assert stored is not None and bytes(stored) == hashlib.md5(data).digest()


async def test_properties_and_metadata_arrive(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    for key, body in (("small.txt", b"tiny"), ("large.bin", payload(9 * MiB))):
        s3_client.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType="text/x-test",
            ContentLanguage="fr",
            ContentDisposition='attachment; filename="x"',
            CacheControl="max-age=60",
            Metadata={"owner": "ops", "build-id": "42"},
        )
        status, [row] = await copy(settings, f"s3://{bucket}/{key}", f"az://{container}/{key}")
        assert status == "done", row.error
        p = blob_service.get_blob_client(container, key).get_blob_properties()
        cs = p.content_settings
        assert (cs.content_type, cs.content_language, cs.cache_control) == (
            "text/x-test",
            "fr",
            "max-age=60",
        )
        assert cs.content_disposition == 'attachment; filename="x"'
        mine = {k: v for k, v in p.metadata.items() if not k.startswith("blobferry_")}
        assert mine == {"owner": "ops", "build_id": "42"}
        assert row.detail["renamed_metadata"] == {"build-id": "build_id"}


@pytest.mark.parametrize("size", [1000, 9 * MiB], ids=["whole", "blocks"])
async def test_a_header_azure_cannot_carry_is_rewritten_or_left_off_and_reported(
    size: int,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """S3 keeps whatever bytes an uploader puts in a header; Azure answers any
    non-ASCII header with 403 AuthenticationFailed, which blobferry used to report as a
    wrong key, failing the copy. A file name in Content-Disposition is rewritten as
    RFC 6266 does (filename*=UTF-8''...), so a download from Azure keeps it: it used
    to be left off. What cannot be rewritten (a Content-Language) is left off. The
    bytes are copied, and the report says both."""
    body = payload(size)
    s3_client.put_object(
        Bucket=bucket,
        Key="f.bin",
        Body=body,
        ContentDisposition='attachment; filename="caf\u00e9.pdf"',
        ContentLanguage="fran\u00e7ais",
    )
    status, [row] = await copy(settings, f"s3://{bucket}/f.bin", f"az://{container}/f.bin")
    assert status == "done", row.error
    disposition = "attachment; filename=\"cafe.pdf\"; filename*=UTF-8''caf%C3%A9.pdf"
    assert row.detail["rewritten"] == {"content_disposition": disposition}
    assert row.detail["dropped"] == {"content_language": "fran\u00e7ais"}
    assert blob_bytes(blob_service, container, "f.bin") == body
    cs = blob_service.get_blob_client(container, "f.bin").get_blob_properties().content_settings
    assert (cs.content_disposition, cs.content_language) == (disposition, None)


@pytest.mark.parametrize("large_route", ["blocks", "pipe"])
async def test_gzip_encoded_object_arrives_byte_for_byte(
    large_route: str,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    if large_route == "pipe":
        settings = settings.model_copy(update={"pipe_max_mb": 64, "pipe_rtt_ms": 1000.0})
    for key, raw in (("log.gz", payload(50_000)), ("big.gz", random_bytes(20 * MiB))):
        body = gz(raw)
        s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentEncoding="gzip")
        status, [row] = await copy(settings, f"s3://{bucket}/{key}", f"az://{container}/{key}")
        assert status == "done", row.error
        assert row.detail["route"] == ("whole" if key == "log.gz" else large_route)
        assert blob_bytes(blob_service, container, key) == body
        p = blob_service.get_blob_client(container, key).get_blob_properties()
        assert p.content_settings.content_encoding == "gzip"


@pytest.mark.parametrize("size", [1000, 5 * MiB], ids=["whole", "blocks"])
async def test_awkward_keys(
    size: int,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Every byte a key may hold that a URL treats specially, on the one-GET route (a
    presigned GET from a listing, Put Blob) and on the block route (a HEAD through
    botocore, presigned ranged GETs, Put Block and Put Block List)."""
    keys = [
        "with space/a b.txt",
        "unicode/žluťoučký kůň ☃.bin",
        "plus/a+b+c.bin",
        "q/what?.txt",
        "marks/50% #1 ~x=y&z;'\"(1)!*@$,.bin",
        "slashes//double//x.bin",
        "dots/.x/..y/z./...bin",
    ]
    for i, key in enumerate(keys):
        s3_client.put_object(Bucket=bucket, Key=key, Body=payload(size + i, seed=i))
    status, rows = await copy(settings, f"s3://{bucket}/", f"az://{container}/copied/")
    assert status == "done", [r.error for r in rows]
    assert blob_names(blob_service, container) == sorted(f"copied/{k}" for k in keys)
    for key in keys:
        assert blob_bytes(blob_service, container, f"copied/{key}") == s3_bytes(
            s3_client, bucket, key
        )


async def test_keys_that_azure_would_rename_fail_alone_and_land_nowhere(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """S3 keys are opaque; Azure resolves '.' and '..' segments of a blob name as a URL
    path does. 'p/a/../../b' would land outside the destination and 'p/./c' on 'p/c'."""
    keys = {
        "p/c": b"the real c",
        "p/./c": b"an impostor",
        "p/a/../../b": b"an escapee",
        "p/..": b"a parent",
        "p/ctl\x01.bin": b"a control character",
    }
    for key, body in keys.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    listed = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == sorted(keys)  # S3 holds each under its own name
    status, rows = await copy(settings, f"s3://{bucket}/p/", f"az://{container}/out/")
    assert status == "failed"
    by_source = {r.source.removeprefix(f"s3://{bucket}/"): r for r in rows}
    assert by_source["p/c"].status == "copied"
    for key in ("p/./c", "p/a/../../b", "p/.."):
        assert by_source[key].status == "failed"
        assert "resolved away by Azure" in (by_source[key].error or "")
    assert "control characters" in (by_source["p/ctl\x01.bin"].error or "")
    assert blob_names(blob_service, container) == ["out/c"]
    assert blob_bytes(blob_service, container, "out/c") == b"the real c"


async def test_prefix_of_100_objects(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    sizes = {f"data/part-{i:03d}.bin": (i * 7919) % 40_000 for i in range(100)}
    sizes["data/sub/bigger.bin"] = 9 * MiB
    for key, size in sizes.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=payload(size, seed=size))
    s3_client.put_object(Bucket=bucket, Key="data/folder/", Body=b"")  # a folder marker
    s3_client.put_object(Bucket=bucket, Key="elsewhere.bin", Body=b"not under the prefix")
    status, rows = await copy(settings, f"s3://{bucket}/data/", f"az://{container}/mirror/")
    assert status == "done", [r.error for r in rows if r.error]
    assert len(rows) == 101 and {r.status for r in rows} == {"copied"}
    assert blob_names(blob_service, container) == sorted(
        "mirror/" + k.removeprefix("data/") for k in sizes
    )
    for key in [*list(sizes)[::10], "data/sub/bigger.bin"]:
        name = "mirror/" + key.removeprefix("data/")
        assert blob_bytes(blob_service, container, name) == payload(sizes[key], seed=sizes[key])


async def test_listing_comes_in_pages_each_asked_for_ahead(
    settings: Settings, s3_client: Any, bucket: str
) -> None:
    keys = [f"p/{i}.bin" for i in range(7)]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    s3_client.put_object(Bucket=bucket, Key="p/zz/", Body=b"")  # a folder marker, last
    async with S3Reader(settings) as s3:
        pages = [page async for page in s3.pages(S3Address(bucket, "p/"), first=2, then=3)]
        assert [len(page) for page in pages] == [2, 3, 2]  # the marker filled a place
        assert [x.key for page in pages for x in page] == keys
        # Left after one page, the listing leaves no request of its own behind.
        async with aclosing(s3.pages(S3Address(bucket, "p/"), first=2, then=3)) as it:
            assert len(await anext(it)) == 2
        assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_stop_ends_the_listing_and_leaves_the_job_interrupted(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    settings = make_settings(tmp_path, moto_endpoint, azurite_endpoint, max_transfers=1)
    for i in range(3):
        s3_client.put_object(Bucket=bucket, Key=f"q/{i}", Body=b"x")
    [spec] = parse_job(
        json.dumps({"source": f"s3://{bucket}/q/", "destination": f"az://{container}/q/"})
    )
    stop = asyncio.Event()
    pages_read = 0
    state = StateStore.in_dir(settings.state_dir)
    async with app.engine(settings, stop) as e:
        listing = e.s3.pages

        async def counted(prefix: S3Address, first: int, then: int = 1000) -> Any:
            nonlocal pages_read
            async for page in listing(prefix, first, then):
                pages_read += 1
                yield page

        e.s3.pages = counted  # type: ignore[method-assign]
        stop.set()
        sup = Supervisor(settings, e.s3, e.copier, state, stop)
        state.job_started("j")
        assert await sup.run_job("j", [spec]) == "interrupted"
    rows = list(state.transfers("j"))
    state.close()
    # One page was read and none admitted; the second was not waited for, and the
    # prefix is not reported empty: the next start lists it again.
    assert pages_read == 1
    assert rows == []


async def test_a_pages_largest_objects_start_first_and_the_report_keeps_key_order(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    settings = make_settings(tmp_path, moto_endpoint, azurite_endpoint, max_transfers=1)
    sizes = {"a": 1000, "b": 3000, "c": 2000, "d": 5000, "e": 4000}
    for key, size in sizes.items():
        s3_client.put_object(Bucket=bucket, Key=f"m/{key}", Body=payload(size, seed=size))
    status, rows = await copy(settings, f"s3://{bucket}/m/", f"az://{container}/m/")
    assert status == "done"
    assert [r.source.rsplit("/", 1)[1] for r in rows] == ["a", "b", "c", "d", "e"]
    # One transfer at a time: the first page is that one object, the next holds the rest.
    started = sorted(rows, key=lambda r: r.started_at)
    assert [r.source.rsplit("/", 1)[1] for r in started] == ["a", "d", "e", "b", "c"]
    for key, size in sizes.items():
        assert blob_bytes(blob_service, container, f"m/{key}") == payload(size, seed=size)


async def test_overwrite_never_skips_existing(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"new")
    blob_service.get_blob_client(container, "k").upload_blob(b"old")
    status, [row] = await copy(settings, f"s3://{bucket}/k", f"az://{container}/k", "never")
    assert (status, row.status) == ("done", "skipped")
    assert blob_bytes(blob_service, container, "k") == b"old"
    status, [row] = await copy(settings, f"s3://{bucket}/k", f"az://{container}/k", "always")
    assert (status, row.status) == ("done", "copied")
    assert blob_bytes(blob_service, container, "k") == b"new"


@pytest.mark.parametrize("route", ["whole", "pipe", "blocks"])
async def test_overwrite_never_writes_on_every_route(
    route: str,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """'never' makes every write conditional on the blob's absence. The block route's
    condition went to the SDK as etag='*' with IfMissing, which the SDK does not take
    for IfMissing and handed on to aiohttp: every such commit failed as an internal
    error, and no test had written a large object with 'never'."""
    data = payload(1024 if route == "whole" else 9 * MiB, seed=13)
    s3_client.put_object(Bucket=bucket, Key="n.bin", Body=data)
    tuned = settings.model_copy(
        update={"pipe_max_mb": 16 if route == "pipe" else 0, "pipe_rtt_ms": 1000.0}
    )
    status, [row] = await copy(tuned, f"s3://{bucket}/n.bin", f"az://{container}/n.bin", "never")
    assert status == "done", row.error
    assert (row.status, row.detail["route"]) == ("copied", route)
    assert blob_bytes(blob_service, container, "n.bin") == data


@pytest.mark.parametrize(
    ("source", "destination", "reason"),
    [
        ("s3://{bucket}/missing.bin", "az://{container}/x", "no such key in bucket"),
        (
            "s3://no-such-bucket-here/x",
            "az://{container}/x",
            "bucket 'no-such-bucket-here' does not exist",
        ),
        ("s3://no-such-bucket-here/p/", "az://{container}/p/", "does not exist"),
        ("s3://{bucket}/empty-prefix/", "az://{container}/p/", "no objects under"),
        (
            "s3://{bucket}/present.bin",
            "az://no-such-container/x",
            "container 'no-such-container' does not exist; create it, or set "
            "azure.create_containers = true",
        ),
        (
            "s3://{bucket}/big.bin",
            "az://no-such-container/x",
            "container 'no-such-container' does not exist",
        ),
    ],
)
async def test_missing_things_fail_with_a_reason(
    source: str,
    destination: str,
    reason: str,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="present.bin", Body=b"here")
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=payload(9 * MiB))
    status, [row] = await copy(
        settings, source.format(bucket=bucket), destination.format(container=container)
    )
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and reason in row.error
    assert blob_names(blob_service, container) == []


@pytest.mark.parametrize("route", ["whole", "pipe", "blocks"])
@pytest.mark.parametrize("kind", ["AppendBlob", "PageBlob", "leased"])
async def test_a_blob_in_the_way_is_replaced_whole_or_left_with_a_reason(
    route: str,
    kind: str,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Put Blob, whole or piped, replaces a page or append blob in one step, as overwrite
    asks. Blocks
    cannot be staged into one (Azure answers InvalidBlobType, AzCopy's and blobferry's
    old reason for a failure nobody could act on), and a leased blob takes no write at
    all: those fail saying what is in the way, and the blob in the way is untouched."""
    size = 1024 if route == "whole" else 9 * MiB
    tuned = settings.model_copy(update={"pipe_max_mb": 16, "pipe_rtt_ms": 1000.0})
    data = payload(size, seed=5)
    s3_client.put_object(Bucket=bucket, Key="o.bin", Body=data)
    old = blob_service.get_blob_client(container, "o.bin")
    if kind == "AppendBlob":
        old.create_append_blob()
        old.append_block(b"old bytes")
    elif kind == "PageBlob":
        old.create_page_blob(512)
    else:
        old.upload_blob(b"old bytes")
        old.acquire_lease(-1)
    before = blob_bytes(blob_service, container, "o.bin")
    status, [row] = await copy(
        tuned if route == "pipe" else settings,
        f"s3://{bucket}/o.bin",
        f"az://{container}/o.bin",
        overwrite="always",
    )
    if route != "blocks" and kind != "leased":
        assert (status, row.detail["route"]) == ("done", route), row.error
        assert blob_bytes(blob_service, container, "o.bin") == data
        assert old.get_blob_properties().blob_type == "BlockBlob"
        return
    reason = "active lease; break or release it" if kind == "leased" else "page or append blob"
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None and reason in row.error, row.error
    assert old.get_blob_properties().blob_type == ("BlockBlob" if kind == "leased" else kind)
    assert blob_bytes(blob_service, container, "o.bin") == before


@pytest.mark.parametrize("committed", [False, True], ids=["nothing-committed", "a-blob"])
async def test_blocks_another_tool_left_are_discarded_or_named(
    committed: bool,
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """An upload another tool left unfinished holds block IDs of another length, and
    Azure takes only one length per blob: every block of ours was refused as
    InvalidBlobOrBlock ("rejected the name") for the 7 days such blocks live. With
    nothing committed, deleting the blob deletes only those blocks, so blobferry does
    and copies; beside a committed blob it says what is in the way and touches nothing."""
    data = payload(9 * MiB, seed=8)
    s3_client.put_object(Bucket=bucket, Key="o.bin", Body=data)
    blob = blob_service.get_blob_client(container, "o.bin")
    if committed:
        blob.upload_blob(b"old bytes")
    for n in range(3):
        blob.stage_block(f"rclone-{n:04d}", b"partial")
    status, [row] = await copy(
        settings, f"s3://{bucket}/o.bin", f"az://{container}/o.bin", overwrite="always"
    )
    if committed:
        assert (status, row.status) == ("failed", "failed")
        assert row.error is not None and "another tool left on this blob" in row.error
        assert blob_bytes(blob_service, container, "o.bin") == b"old bytes"
        assert len(blob.get_block_list("uncommitted")[1]) == 3
        return
    assert status == "done", row.error
    assert row.detail["route"] == "blocks"
    assert "discarded 3 uncommitted block(s)" in row.detail["note"]
    assert blob_bytes(blob_service, container, "o.bin") == data


def test_block_id_lengths_are_compared_as_azure_holds_them() -> None:
    ours = "a" * 62
    assert sent_length(ours) == 84  # what every block ID of blobferry's is
    assert sent_length("rclone-0000") == len(base64.b64encode(b"rclone-0000"))
    binary = base64.b64encode(b"\xff\xfe\x00\x01\x02\x03").decode()  # not text: as sent
    assert sent_length(binary) == len(binary)


async def test_account_url_with_key_or_sas_token(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    from pydantic import SecretStr

    from daemon.service_settings import AzureSettings
    from tests.emulators import AZURITE_KEY

    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=payload(5 * MiB, seed=9))
    url = f"{azurite_endpoint}/devstoreaccount1"
    sas = generate_account_sas(
        "devstoreaccount1",
        AZURITE_KEY,
        ResourceTypes(object=True, container=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True),
        expiry=datetime.now(UTC) + timedelta(minutes=10),
    )
    for name, azure in (
        ("with-key", AzureSettings(account_url=url, account_key=SecretStr(AZURITE_KEY))),
        ("with-sas", AzureSettings(account_url=url, sas_token=SecretStr(sas))),
    ):
        tuned = settings.model_copy(update={"azure": azure})
        status, [row] = await copy(tuned, f"s3://{bucket}/k.bin", f"az://{container}/{name}")
        assert status == "done", row.error
        assert blob_bytes(blob_service, container, name) == payload(5 * MiB, seed=9)


@pytest.mark.parametrize("size", [1024, 9 * MiB], ids=["whole", "blocks"])
async def test_an_expired_sas_token_is_named_as_the_reason(
    size: int,
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A transfer of days outlives a SAS token of hours. Azure says only
    AuthenticationFailed; the report says the token expired, when, and what to do."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    from pydantic import SecretStr

    from daemon.service_settings import AzureSettings
    from tests.emulators import AZURITE_KEY

    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=payload(size))
    ended = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    sas = generate_account_sas(
        "devstoreaccount1",
        AZURITE_KEY,
        ResourceTypes(object=True, container=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True),
        expiry=ended,
    )
    url = f"{azurite_endpoint}/devstoreaccount1"
    azure = AzureSettings(account_url=url, sas_token=SecretStr(sas))
    tuned = settings.model_copy(update={"azure": azure})
    status, [row] = await copy(tuned, f"s3://{bucket}/k.bin", f"az://{container}/k.bin")
    assert (status, row.status) == ("failed", "failed")
    assert row.error is not None
    assert f"the SAS token expired at {ended:%Y-%m-%d %H:%M:%S} UTC" in row.error, row.error
    assert "sig=" not in row.error and sas not in row.error
    assert blob_names(blob_service, container) == []


async def test_a_write_only_sas_copies_every_route_with_overwrite_always(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Create and write: the least an upload needs, and a common way to grant one. No
    route may need to read: the block path cannot list staged blocks (so it cannot
    resume) and goes on; the pipe's timing HEAD is refused but timed. 'if-changed' must
    read to compare, and says so."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    from pydantic import SecretStr

    from daemon.service_settings import AzureSettings
    from tests.emulators import AZURITE_KEY

    sas = generate_container_sas(
        "devstoreaccount1",
        container,
        account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(write=True, create=True),
        expiry=datetime.now(UTC) + timedelta(minutes=10),
    )
    azure = AzureSettings(
        account_url=f"{azurite_endpoint}/devstoreaccount1", sas_token=SecretStr(sas)
    )
    bodies = {"small": payload(1000), "big": payload(9 * MiB, seed=4)}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    routes = {("small", 0): "whole", ("big", 0): "blocks", ("big", 64): "pipe"}
    for (key, pipe), route in routes.items():
        tuned = settings.model_copy(
            update={"azure": azure, "pipe_max_mb": pipe, "pipe_rtt_ms": 1000.0}
        )
        dst = f"{key}-{route}"
        status, [row] = await copy(
            tuned, f"s3://{bucket}/{key}", f"az://{container}/{dst}", overwrite="always"
        )
        assert status == "done", row.error
        assert row.detail["route"] == route
        assert blob_bytes(blob_service, container, dst) == bodies[key]
        status, [row] = await copy(tuned, f"s3://{bucket}/{key}", f"az://{container}/new-{dst}")
        assert status == "failed"
        assert row.error is not None and "grant read, or set overwrite 'always'" in row.error
    assert not any(n.startswith("new-") for n in blob_names(blob_service, container))


async def test_an_object_alone_takes_the_whole_memory_budget_and_block_concurrency_caps_it(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """On a distant link each stream is slow, so one file's speed is how many of its
    blocks are in flight. Alone, an object takes every block the memory budget holds
    (24 here, more than the 16 it was once held to); block_concurrency still caps it."""
    body = payload(32 * MiB, seed=24)
    s3_client.put_object(Bucket=bucket, Key="wide.bin", Body=body)
    [spec] = parse_job(
        f'{{"source": "s3://{bucket}/wide.bin", "destination": "az://{container}/wide.bin", '
        '"overwrite": "always"}'
    )
    # Each connection at 4 MiB/s: a 1 MiB block takes a quarter of a second to read, so
    # every block the object is allowed is in flight at once.
    async with FaultProxy(moto_endpoint, Faults(rate_bps=4 * MiB)) as proxy:
        for cap, widest in ((None, 24), (6, 6)):
            tuned = through(settings, proxy, pipe_max_mb=0, block_size_mb=1, memory_mb=24)
            if cap is not None:
                tuned = tuned.model_copy(update={"block_concurrency": cap})
            budget = Budget(tuned.memory_bytes)
            async with S3Reader(tuned) as s3, AzureWriter(tuned) as az:
                outcome = await Copier(tuned, s3, az, budget).copy(spec)
            assert (outcome.status, outcome.route) == ("copied", "blocks")
            assert budget.peak == widest * MiB, (cap, budget.peak / MiB)
            assert budget.used == 0
            assert blob_bytes(blob_service, container, "wide.bin") == body


@pytest.mark.parametrize("route", ["blocks", "server-side"])
async def test_a_transfer_resumed_with_another_block_size_keeps_the_blocks_azure_holds(
    route: str,
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A transfer of hundreds of GB is stopped, block_size_mb is changed (to tune it,
    say), and it starts again. Block IDs used to hash the block size in, so the new run
    found none of the staged blocks its own and read the whole object again; the IDs now
    name their layout, and the run goes on in the layout Azure holds blocks of."""
    parts = 20 * MiB  # over 16 MiB: cut into 1 MiB blocks in the first run, 4 in the next
    if route == "blocks":
        body = multipart_object(s3_client, bucket, "obj.bin", 2 * parts, parts)
        source_urls = None
    else:
        body = payload(2 * parts, seed=72)
        s3_client.put_object(Bucket=bucket, Key="obj.bin", Body=body)
        url = _azurite_url(blob_service, container, "source.bin", body)

        async def source_urls(_: ObjectInfo) -> str:
            return url

    [spec] = parse_job(
        f'{{"source": "s3://{bucket}/obj.bin", "destination": "az://{container}/copy.bin", '
        f'"overwrite": "always", "mode": "{"server-side" if route != "blocks" else "stream"}"}}'
    )
    stopping = asyncio.Event()
    landed = 0

    def progress(n: int, *, reused: bool = False) -> None:
        nonlocal landed
        landed += 1
        if landed == 6:
            stopping.set()  # a drain: the blocks in flight land, no new one starts

    async with FaultProxy(moto_endpoint) as proxy:
        first = through(settings, proxy, pipe_max_mb=0, block_size_mb=1, block_concurrency=2)
        second = through(settings, proxy, pipe_max_mb=0)  # 4 MiB blocks
        assert second.block_size == 4 * MiB
        async with S3Reader(first) as s3, AzureWriter(first) as az:
            copier = Copier(first, s3, az, Budget(first.memory_bytes), stopping, source_urls)
            with pytest.raises(Interrupted):
                await copier.copy(spec, progress=progress)
        client = blob_service.get_blob_client(container, "copy.bin")
        staged = client.get_block_list("uncommitted")[1]
        assert 6 <= len(staged) < 40 and {b.size for b in staged} == {MiB}
        read_before = proxy.bytes_down
        async with S3Reader(second) as s3, AzureWriter(second) as az:
            copier = Copier(second, s3, az, Budget(second.memory_bytes), None, source_urls)
            outcome = await copier.copy(spec)
        read_after = proxy.bytes_down - read_before
    assert (outcome.status, outcome.route) == ("copied", route)
    assert outcome.blocks_reused == len(staged)
    assert outcome.note is not None
    assert f"resumed in the 1 MiB blocks an earlier run staged ({len(staged)} held)" in (
        outcome.note
    )
    assert blob_bytes(blob_service, container, "copy.bin") == body
    committed = client.get_block_list("committed")[0]
    assert len(committed) == 40 and {b.size for b in committed} == {MiB}
    if route == "blocks":
        # Only the blocks Azure did not hold were read again (with a HEAD, the part
        # sizes and response headers besides).
        assert read_after <= 2 * parts - len(staged) * MiB + 256 * 1024
