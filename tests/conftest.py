"""Real emulators, started on free ports for the session and stopped after.

S3 is moto's server (``moto_server``), Azure Blob is Azurite (``npm ci`` puts it in
node_modules). Each test gets its own bucket and container, so tests never see each
other's objects.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from botocore.config import Config

from daemon import app
from daemon.reload import Reloader
from daemon.settings import Settings, load_settings
from daemon.sources.directory import report_name
from tests.emulators import AZURITE_KEY, connection_string, emulator
from tests.strict_s3 import StrictS3, strict_s3_in_thread

__all__ = ["AZURITE_KEY", "connection_string", "make_settings", "running_daemon"]

# The tests own their environment: no developer settings or AWS profile leak in.
for _k in list(os.environ):
    if _k.startswith(("BLOBFERRY_", "AWS_")) or _k == "AZURE_STORAGE_CONNECTION_STRING":
        del os.environ[_k]
os.environ.update(
    AWS_ACCESS_KEY_ID="testing-key-id",
    AWS_SECRET_ACCESS_KEY="testing-secret",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto itself: lenient about signatures. Tests reach it through ``moto_endpoint``."""
    with emulator("moto", tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def strict_s3(moto_server: str) -> Iterator[StrictS3]:
    """moto behind a front that checks every signature as Amazon S3 does."""
    secrets = {os.environ["AWS_ACCESS_KEY_ID"]: os.environ["AWS_SECRET_ACCESS_KEY"]}
    with strict_s3_in_thread(moto_server, secrets) as front:
        yield front


@pytest.fixture(scope="session")
def moto_endpoint(strict_s3: StrictS3) -> str:
    """Where tests and the daemon reach S3: moto, signatures checked as S3 checks them."""
    return strict_s3.endpoint


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with emulator("azurite", tmp_path_factory.mktemp("azurite") / "azurite.log") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_client(moto_server: str) -> Any:
    """The tests' own hands on S3, to set up and inspect: straight to moto. Its uploads
    carry no checksum unless a test asks for one: objects from before S3's default
    checksums (December 2024), proven by their ETags. (Real S3 now gives an object
    uploaded without one a CRC64NVME; moto does not, so tests that want it ask.)"""
    config = Config(request_checksum_calculation="when_required")
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", config=config)


@pytest.fixture(scope="session")
def blob_service(azurite_endpoint: str) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(connection_string(azurite_endpoint))


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def container(blob_service: BlobServiceClient) -> str:
    name = f"ctr-{uuid.uuid4().hex[:12]}"
    blob_service.create_container(name)
    return name


def make_settings(tmp_path: Path, s3_endpoint: str, az_endpoint: str, **overrides: Any) -> Settings:
    overrides.setdefault("jobs_dir", tmp_path / "jobs")
    overrides.setdefault("state_dir", tmp_path / "state")
    overrides.setdefault("poll_interval_s", 0.2)
    overrides.setdefault("s3", {"endpoint_url": s3_endpoint})
    overrides.setdefault("azure", {"connection_string": connection_string(az_endpoint)})
    overrides.setdefault("retry", {"backoff_s": 0.05, "backoff_max_s": 0.5})
    # The emulators are near, so objects over a block would be piped whole: the tests
    # of the block path (resume, per-block retries, repair) turn that off; test_pipe.py
    # turns it on.
    overrides.setdefault("pipe_max_mb", 0)
    return load_settings(None, **overrides)


@pytest.fixture
def settings(tmp_path: Path, moto_endpoint: str, azurite_endpoint: str) -> Settings:
    return make_settings(tmp_path, moto_endpoint, azurite_endpoint)


@dataclass
class RunningDaemon:
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def inbox(self) -> Path:
        return self.settings.jobs_dir / "inbox"

    def drop(self, name: str, text: str) -> Path:
        """Drop a job the way a careful writer does: write aside, then rename in."""
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        target = self.inbox / name
        tmp.rename(target)
        return target

    async def wait_finished(self, name: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
        """Wait for a job to land in done/ or failed/; return the folder and its report."""
        import json

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for folder in ("done", "failed"):
                report = self.settings.jobs_dir / folder / report_name(name)
                if report.exists() and (self.settings.jobs_dir / folder / name).exists():
                    return folder, json.loads(report.read_text())
            if self.task.done():
                self.task.result()
                raise AssertionError("daemon stopped before the job finished")
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {name} did not finish within {timeout} s")


@asynccontextmanager
async def running_daemon(
    settings: Settings, reloader: Reloader | None = None
) -> AsyncIterator[RunningDaemon]:
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(app.serve(settings, stop, on_ready=ready.set, reloader=reloader))
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
    try:
        yield RunningDaemon(settings, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
