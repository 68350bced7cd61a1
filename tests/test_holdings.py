"""A prefix's copies are told whether their blobs exist by one listing of the
destination, in step with S3's, instead of asking with a HEAD each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.holdings import Holdings, Known
from daemon.seams import ExistingBlob
from daemon.settings import Settings
from tests.helpers import MiB, azure_through, blob_bytes, blob_names, copy, payload
from tests.proxy import FaultProxy, azure_answers


def blob(n: int) -> ExistingBlob:
    return ExistingBlob(n, {"v": str(n)})


async def pages_of(*pages: list[str], fail_after: int | None = None) -> AsyncIterator[list[Any]]:
    for i, page in enumerate(pages):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("listing broke")
        yield [(name, blob(len(name))) for name in page]


async def test_the_cursor_answers_in_step_and_only_for_what_it_can_vouch_for() -> None:
    """Azure may place a non-ASCII name anywhere: it is never answered for, and it
    cannot hide an ASCII name behind it. Names the listing went past are absent; the
    cursor holds no more than a page ahead."""
    listing = Holdings(
        pages_of(
            ["a/1", "a/3", "a/\u00e9", "a/5"],  # "a/é" placed where code points would not
            ["a/7", "b/1"],
        )
    )
    first = await listing.known(["a/1", "a/2", "a/3"])
    assert first == {"a/1": Known(blob(3)), "a/2": Known(None), "a/3": Known(blob(3))}
    assert len(listing._ahead) == 1  # a/5, kept for the next page; a/é not kept at all
    second = await listing.known(["a/4", "a/5", "a/\u00e9", "a/6", "a/7", "a/8"])
    assert second == {
        "a/4": Known(None),
        "a/5": Known(blob(3)),
        "a/6": Known(None),
        "a/7": Known(blob(3)),
        "a/8": Known(None),
    }  # a/é: no answer, its copy asks with a HEAD
    assert await listing.known(["d/1"]) == {"d/1": Known(None)}  # past the listing's end
    await listing.aclose()


async def test_a_listing_that_would_cost_more_than_it_saves_is_given_up() -> None:
    """Three objects into a prefix whose listing first holds 5,000 other blobs: three
    requests, then the copies ask with a HEAD each. A listing that answers as it goes
    may go on: one more request per hundred names answered."""
    crowded = [[f"a/{p}-{i:04d}" for i in range(1000)] for p in range(5)] + [["z/1"]]
    pulled = 0

    async def counted(pages: list[list[str]]) -> AsyncIterator[list[Any]]:
        nonlocal pulled
        async for page in pages_of(*pages):
            pulled += 1
            yield page

    listing = Holdings(counted(crowded))
    assert await listing.known(["z/1", "z/2", "z/3"]) == {}
    assert pulled == 3
    assert await listing.known(["z/4"]) == {}  # given up for good
    pulled = 0
    answering = [[f"k/{p:02d}-{i:03d}" for i in range(100)] for p in range(30)]
    listing = Holdings(counted(answering))
    for p in range(30):
        names = [f"k/{p:02d}-{i:03d}" for i in range(100)]
        assert len(await listing.known(names)) == 100
    assert pulled == 30


async def test_a_listing_that_fails_answers_nothing_from_then_on() -> None:
    listing = Holdings(pages_of(["a"], ["b"], fail_after=1))
    assert await listing.known(["a"]) == {"a": Known(blob(1))}
    assert await listing.known(["b"]) == {}
    assert await listing.known(["c"]) == {}


@pytest.mark.parametrize("overwrite", ["if-changed", "never"])
async def test_small_objects_are_told_by_the_listing_and_large_ones_still_ask(
    overwrite: str,
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """40 small objects, 10 already copied and one since changed in S3, plus one of
    blocks and one with a non-ASCII name: the small ASCII ones are decided by one
    listing (no HEAD each); the large and the non-ASCII one ask with a HEAD, as before."""
    keys = [f"p/{i:02d}.bin" for i in range(40)]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=payload(1000, seed=len(key)))
    status, _ = await copy(
        settings, f"s3://{bucket}/p/", f"az://{container}/q/", include=["0?.bin"]
    )
    assert status == "done"  # q/00.bin ... q/09.bin, as a previous run left them
    s3_client.put_object(Bucket=bucket, Key="p/05.bin", Body=b"changed since")
    s3_client.put_object(Bucket=bucket, Key="p/big.bin", Body=payload(9 * MiB))
    s3_client.put_object(Bucket=bucket, Key="p/caf\u00e9.bin", Body=b"accented")
    async with FaultProxy(azurite_endpoint) as azp:
        via = azure_through(settings, azp.endpoint)
        status, rows = await copy(via, f"s3://{bucket}/p/", f"az://{container}/q/", overwrite)
    assert status == "done", [r.error for r in rows if r.error]
    by_key = {r.source.rsplit("/", 1)[1]: r for r in rows}
    copied = {k for k, r in by_key.items() if r.status == "copied"}
    unchanged = {f"{i:02d}.bin" for i in range(10)} - {"05.bin"}
    if overwrite == "if-changed":
        assert copied == set(by_key) - unchanged
        assert blob_bytes(blob_service, container, "q/05.bin") == b"changed since"
    else:
        assert copied == set(by_key) - unchanged - {"05.bin"}
        assert by_key["05.bin"].detail["note"] == "destination exists and overwrite is 'never'"
    for key in unchanged:
        assert by_key[key].status == "skipped"
    heads = sorted(r.split(" ")[1] for r in azp.requests if r.startswith("HEAD "))
    assert heads == [
        f"/devstoreaccount1/{container}/q/big.bin",
        f"/devstoreaccount1/{container}/q/caf%C3%A9.bin",
    ]
    lists = [r for r in azp.requests if "comp=list" in r and "restype=container" in r]
    assert len(lists) == 1, lists
    assert len(blob_names(blob_service, container)) == 42


async def test_a_refused_listing_leaves_each_copy_to_ask(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Credentials that may read blobs but not list them (a SAS without 'l'): the
    listing's refusal costs nothing but the HEADs it would have saved."""
    for i in range(5):
        s3_client.put_object(Bucket=bucket, Key=f"p/{i}", Body=payload(100, seed=i))
    refusal = azure_answers(b"comp=list", 403, "AuthorizationPermissionMismatch")
    async with FaultProxy(azurite_endpoint, refusal) as azp:
        via = azure_through(settings, azp.endpoint)
        status, rows = await copy(via, f"s3://{bucket}/p/", f"az://{container}/p/")
    assert status == "done" and {r.status for r in rows} == {"copied"}
    assert len([r for r in azp.requests if r.startswith("HEAD ")]) == 5
    assert blob_names(blob_service, container) == [f"p/{i}" for i in range(5)]
