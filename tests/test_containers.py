"""azure.create_containers: a destination container that does not exist is created once,
as AzCopy and rclone do; off (the default), the transfer fails naming the setting."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.settings import Settings
from tests.helpers import MiB, azure_through, blob_bytes, copy, payload
from tests.proxy import FaultProxy, azure_answers


@pytest.fixture
def new_container(blob_service: BlobServiceClient) -> Iterator[str]:
    """A container name no one has created; deleted afterwards if a test made it."""
    name = f"new-{uuid.uuid4().hex[:12]}"
    yield name
    client = blob_service.get_container_client(name)
    if client.exists():
        client.delete_container()


def creates(requests: list[str], container: str) -> list[str]:
    return [r for r in requests if r == f"PUT /devstoreaccount1/{container}?restype=container"]


async def test_a_missing_container_is_created_once_for_every_transfer_into_it(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    new_container: str,
) -> None:
    """A prefix of 12 small objects and one of blocks, copied at once into a container
    that does not exist: one request creates it, and everything is copied.
    A dry run before it reports every object as to be copied and creates nothing."""
    bodies = {f"p/{i:02d}": payload(2000, seed=i) for i in range(12)}
    bodies["p/big"] = payload(9 * MiB, seed=99)
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    async with FaultProxy(azurite_endpoint) as azp:
        via = azure_through(settings, azp.endpoint)
        via.azure.create_containers = True
        src, dst = f"s3://{bucket}/p/", f"az://{new_container}/q/"
        status, rows = await copy(via, src, dst, dry_run=True)
        assert status == "done", [r.error for r in rows if r.error]
        assert {r.detail.get("note") for r in rows} == {"dry run: would be copied"}
        assert not blob_service.get_container_client(new_container).exists()
        assert creates(azp.requests, new_container) == []
        status, rows = await copy(via, src, dst)
    assert status == "done", [r.error for r in rows if r.error]
    assert {r.status for r in rows} == {"copied"} and len(rows) == 13
    assert len(creates(azp.requests, new_container)) == 1
    for key, body in bodies.items():
        assert blob_bytes(blob_service, new_container, "q/" + key[2:]) == body


async def test_a_single_object_creates_its_container_and_an_existing_one_is_used(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    new_container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="one", Body=b"one object")
    tuned = settings.model_copy(deep=True)
    tuned.azure.create_containers = True
    for ctr in (new_container, container):  # created, then one that was there
        status, [row] = await copy(tuned, f"s3://{bucket}/one", f"az://{ctr}/one")
        assert status == "done", row.error
        assert blob_bytes(blob_service, ctr, "one") == b"one object"


async def test_credentials_that_may_not_create_fail_the_prefix_once_with_the_reason(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    new_container: str,
) -> None:
    """Azure refuses the creation (a SAS without the permission): the prefix fails as
    one transfer saying what to do."""
    for i in range(3):
        s3_client.put_object(Bucket=bucket, Key=f"p/{i}", Body=b"x")
    refusal = azure_answers(
        f"PUT /devstoreaccount1/{new_container}?restype=container ".encode(),
        403,
        "AuthorizationPermissionMismatch",
    )
    async with FaultProxy(azurite_endpoint, refusal) as azp:
        via = azure_through(settings, azp.endpoint)
        via.azure.create_containers = True
        status, rows = await copy(via, f"s3://{bucket}/p/", f"az://{new_container}/p/")
    assert status == "failed"
    [row] = rows
    assert row.error is not None
    assert f"container {new_container!r} does not exist and the credentials may not" in (row.error)
    assert not blob_service.get_container_client(new_container).exists()


async def test_a_container_deleted_during_a_run_fails_that_copy_and_is_created_again(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    new_container: str,
) -> None:
    """The first object's write finds the container gone (ContainerNotFound): it fails
    saying so, and the next transfer creates the container again instead of trusting
    what the run had learnt."""
    for key in ("p/a", "p/b"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    gone = azure_answers(
        f"PUT /devstoreaccount1/{new_container}/p/a ".encode(), 404, "ContainerNotFound"
    )
    async with FaultProxy(azurite_endpoint, gone) as azp:
        via = azure_through(settings, azp.endpoint, max_transfers=1)  # a, then b
        via.azure.create_containers = True
        status, rows = await copy(via, f"s3://{bucket}/p/", f"az://{new_container}/p/", "always")
    assert status == "failed"
    a, b = sorted(rows, key=lambda r: r.source)
    assert a.status == "failed" and a.error is not None
    assert f"container {new_container!r} was deleted during the copy" in a.error
    assert b.status == "copied", b.error
    assert len(creates(azp.requests, new_container)) == 2
    assert blob_bytes(blob_service, new_container, "p/b") == b"p/b"
