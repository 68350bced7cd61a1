"""One blob, one writer, however its address is spelled.

``az://c/b`` and the configured account's URL of the same blob are one blob: two
transfers into it at once would drop each other's blocks at commit (InvalidBlockList),
so they take turns; a job naming it twice is refused; and an ``https://`` destination
is recognised as the configured account's with a SAS credential too.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ResourceTypes,
    generate_account_sas,
)
from pydantic import SecretStr

from daemon.addresses import parse_azure
from daemon.azure import AzureWriter
from daemon.errors import JobFileError, PermanentError
from daemon.jobs import parse_job
from daemon.service_settings import AzureSettings
from daemon.settings import Settings
from tests.conftest import make_settings, running_daemon
from tests.emulators import AZURITE_KEY
from tests.helpers import MiB, blob_bytes, copy, payload
from tests.proxy import FaultProxy, Faults


def _sas_settings(settings: Settings, azurite_endpoint: str) -> Settings:
    sas = generate_account_sas(
        "devstoreaccount1",
        AZURITE_KEY,
        ResourceTypes(object=True, container=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True, delete=True),
        expiry=datetime.now(UTC) + timedelta(minutes=10),
    )
    azure = AzureSettings(
        account_url=f"{azurite_endpoint}/devstoreaccount1", sas_token=SecretStr(sas)
    )
    return settings.model_copy(update={"azure": azure})


def test_a_job_naming_one_blob_two_ways_is_refused() -> None:
    text = json.dumps(
        {
            "transfers": [
                {"source": "s3://bkt/a.bin", "destination": "az://ctr/b.bin"},
                {
                    "source": "s3://bkt/c.bin",
                    "destination": "https://acct.blob.core.windows.net/ctr/b.bin",
                },
            ]
        }
    )
    with pytest.raises(JobFileError, match="both write"):
        parse_job(text)


@pytest.mark.parametrize("credential", ["connection-string", "sas"])
async def test_every_spelling_of_a_blob_is_one_blob(
    credential: str, settings: Settings, azurite_endpoint: str
) -> None:
    if credential == "sas":
        settings = _sas_settings(settings, azurite_endpoint)
    spellings = [
        "az://ctr/dir/b.bin",
        f"{azurite_endpoint}/devstoreaccount1/ctr/dir/b.bin",
        f"{azurite_endpoint}/devstoreaccount1/ctr/dir%2Fb.bin",
    ]
    async with AzureWriter(settings) as az:
        ids = {az.identify(parse_azure(s)) for s in spellings}
        assert ids == {("devstoreaccount1", "ctr", "dir/b.bin")}
        with pytest.raises(PermanentError, match="not the configured one"):
            az.identify(parse_azure(f"{azurite_endpoint}/otheraccount/ctr/b.bin"))


async def test_an_https_destination_copies_with_a_sas_credential(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"by url")
    dst = f"{azurite_endpoint}/devstoreaccount1/{container}/k.bin"
    status, [row] = await copy(
        _sas_settings(settings, azurite_endpoint), f"s3://{bucket}/k.bin", dst
    )
    assert status == "done", row.error
    assert blob_bytes(blob_service, container, "k.bin") == b"by url"


async def test_two_jobs_into_one_blob_spelled_two_ways_take_turns(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Each job's transfer stages blocks slowly. Azure drops a blob's uncommitted blocks
    that a commit does not list, so had both run at once, one commit would find its
    blocks gone (Azurite keeps them: the wait is what shows it)."""
    first, second = payload(3 * MiB, seed=1), payload(3 * MiB, seed=2)
    s3_client.put_object(Bucket=bucket, Key="one.bin", Body=first)
    s3_client.put_object(Bucket=bucket, Key="two.bin", Body=second)
    async with FaultProxy(moto_endpoint, Faults(rate_bps=2 * MiB)) as slow:
        settings = make_settings(tmp_path, slow.endpoint, azurite_endpoint, block_size_mb=1)
        async with running_daemon(settings) as d:
            d.drop(
                "a.json",
                json.dumps(
                    {
                        "source": f"s3://{bucket}/one.bin",
                        "destination": f"az://{container}/same.bin",
                    }
                ),
            )
            await asyncio.sleep(0.3)
            url = f"{azurite_endpoint}/devstoreaccount1/{container}/same.bin"
            d.drop("b.json", json.dumps({"source": f"s3://{bucket}/two.bin", "destination": url}))
            results = [await d.wait_finished(n, 60) for n in ("a.json", "b.json")]
    assert [folder for folder, _ in results] == ["done", "done"], results
    assert blob_bytes(blob_service, container, "same.bin") in (first, second)
    assert "waiting: another transfer is writing this blob" in capfd.readouterr().out
