"""Prometheus metrics on /metrics, when metrics_address is set."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import aiohttp
import pytest
from azure.storage.blob import BlobServiceClient

from daemon import app
from daemon.errors import ConfigError
from daemon.settings import Settings, load_settings
from tests.conftest import running_daemon
from tests.emulators import free_port
from tests.helpers import MiB, payload
from tests.proxy import FaultProxy, Faults, azure_answers
from tests.test_daemon import job, transfers
from tests.test_faults import through


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value, every sample line of an exposition."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


async def scrape(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


async def test_metrics_count_jobs_transfers_and_bytes(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """After a job of one copy and one missing key, and a job of one skip, /metrics
    counts each by status, the bytes, and reads the memory budget; every help and
    type line comes before its samples, and every status has a sample from the start."""
    body = payload(5 * MiB, seed=7)
    s3_client.put_object(Bucket=bucket, Key="a", Body=body)
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}/metrics"
    # A cap that never binds here, to be read back.
    tuned = settings.model_copy(update={"metrics_address": address, "bandwidth_mb_s": 900})
    async with running_daemon(tuned) as d:
        kind, first = await scrape(url)
        assert kind == "text/plain; version=0.0.4; charset=utf-8"
        before = samples(first)
        assert before["blobferry_bandwidth_cap_bytes_per_second"] == 900e6
        assert before['blobferry_jobs_total{status="cancelled"}'] == 0
        assert before['blobferry_transfers_total{status="copied"}'] == 0
        d.drop(
            "two.json",
            transfers(
                (f"s3://{bucket}/a", f"az://{container}/a"),
                (f"s3://{bucket}/missing", f"az://{container}/m"),
            ),
        )
        assert (await d.wait_finished("two.json"))[0] == "failed"
        d.drop("again.json", job(f"s3://{bucket}/a", f"az://{container}/a"))
        assert (await d.wait_finished("again.json"))[0] == "done"
        _, text = await scrape(url)
        async with aiohttp.ClientSession() as http, http.get(url[: -len("metrics")]) as r:
            assert r.status == 404
    got = samples(text)
    assert got['blobferry_jobs_total{status="done"}'] == 1
    assert got['blobferry_jobs_total{status="failed"}'] == 1
    assert got['blobferry_transfers_total{status="copied"}'] == 1
    assert got['blobferry_transfers_total{status="failed"}'] == 1
    assert got['blobferry_transfers_total{status="skipped"}'] == 1
    assert got["blobferry_copied_bytes_total"] == len(body)
    assert got["blobferry_streamed_bytes_total"] >= len(body)
    assert got["blobferry_transfers_running"] == 0
    assert got["blobferry_jobs_waiting"] == 0
    assert got["blobferry_memory_budget_bytes"] == tuned.memory_mb * MiB
    assert got["blobferry_memory_used_bytes"] == 0
    assert re.search(r'^blobferry_build_info\{version="[^"]+"\} 1$', text, re.M)
    names = [m for m in re.findall(r"^(blobferry_\w+)", text, re.M)]
    for name in dict.fromkeys(names):  # each family: HELP, TYPE, then its samples
        help_at = text.index(f"# HELP {name} ")
        assert text.index(f"# TYPE {name} ") > help_at
        assert text.index(f"\n{name}") > help_at


async def test_metrics_address_taken_or_malformed_is_a_configuration_error(
    settings: Settings,
) -> None:
    with pytest.raises(ConfigError, match="metrics_address"):
        load_settings(None, metrics_address="9464")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        tuned = settings.model_copy(update={"metrics_address": address})
        with pytest.raises(ConfigError) as e:
            await asyncio.wait_for(app.serve(tuned, asyncio.Event()), 30)
    assert str(e.value) == (
        f"configuration error: metrics_address: cannot listen on {address}: Address already in use"
    )


async def test_retries_are_counted_by_step(
    settings: Settings,
    moto_endpoint: str,
    s3_client: Any,
    bucket: str,
    container: str,
) -> None:
    """S3 answers the first three reads 503: the copy succeeds, and /metrics shows three
    more retries of that step (a flaky link shows there before anything fails)."""
    s3_client.put_object(Bucket=bucket, Key="a", Body=payload(3 * MiB, seed=9))
    address = f"127.0.0.1:{free_port()}"
    slowdown = Faults(error_first=3, error_match=f"GET /{bucket}/a?".encode())
    async with FaultProxy(moto_endpoint, slowdown) as proxy:
        tuned = through(settings, proxy, metrics_address=address)
        async with running_daemon(tuned) as d:
            before = samples((await scrape(f"http://{address}/metrics"))[1])
            d.drop("j.json", job(f"s3://{bucket}/a", f"az://{container}/a"))
            assert (await d.wait_finished("j.json"))[0] == "done"
            after = samples((await scrape(f"http://{address}/metrics"))[1])
    assert proxy.errors == 3
    # An object of one block goes in one step, its GET and its Put Blob: "copy".
    step = 'blobferry_retries_total{step="copy"}'
    assert after[step] - before.get(step, 0) == 3


async def test_blocks_staged_by_an_earlier_run_count_as_done_but_not_as_streamed(
    settings: Settings,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A commit refused leaves every block staged; the job run again reuses them all.
    Its transfer has done all its bytes and moved none: the throughput (the streamed
    bytes' rate(), the transfer's rate, and so `blobferry status`'s estimate) must not
    count a resume's reuse as bytes moved in no time."""
    from daemon.state import StateStore
    from tests.helpers import azure_through, copy

    size = 9 * MiB  # three 4 MiB blocks
    body = payload(size, seed=21)
    s3_client.put_object(Bucket=bucket, Key="r", Body=body)
    refused = azure_answers(b"comp=blocklist", 403, "AuthorizationPermissionMismatch")
    async with FaultProxy(azurite_endpoint, refused) as azp:
        status, [row] = await copy(
            azure_through(settings, azp.endpoint), f"s3://{bucket}/r", f"az://{container}/r"
        )
    assert status == "failed" and "not permitted" in (row.error or "")
    address = f"127.0.0.1:{free_port()}"
    tuned = settings.model_copy(update={"metrics_address": address})
    async with running_daemon(tuned) as d:
        d.drop("r.json", job(f"s3://{bucket}/r", f"az://{container}/r"))
        folder, report = await d.wait_finished("r.json")
        got = samples((await scrape(f"http://{address}/metrics"))[1])
    assert folder == "done", report
    assert report["transfers"][0]["blocks_reused"] == 3
    assert report["transfers"][0]["bytes_reused"] == size
    assert got["blobferry_copied_bytes_total"] == size
    assert got["blobferry_streamed_bytes_total"] == 0
    state = StateStore(tuned.state_dir / "blobferry.sqlite3", read_only=True)
    [t] = state.transfers("r.json")
    state.close()
    assert (t.bytes_done, t.bytes_reused, t.rate) == (size, size, 0.0)
