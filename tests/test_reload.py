"""SIGHUP (systemctl reload): the bandwidth cap, max_transfers, memory_mb, log level and
keep_days change live; other changes wait for a restart and are named; a bad file
changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from pydantic import SecretStr
from structlog.testing import capture_logs

from daemon.errors import ConfigError
from daemon.logs import set_level
from daemon.reload import Reloader, changed
from daemon.service_settings import AzureSettings
from daemon.settings import Settings
from tests.conftest import running_daemon
from tests.emulators import free_port
from tests.helpers import MiB, blob_bytes, payload
from tests.test_daemon import job
from tests.test_faults import daemon_env, notified_daemon
from tests.test_metrics import samples, scrape


@pytest.fixture(autouse=True)
def _level_restored() -> Iterator[None]:
    """A reload's log level is global: the next test must not start at "warning"."""
    yield
    set_level("info")


def test_changes_are_named_by_setting_never_by_value(settings: Settings) -> None:
    new = settings.model_copy(
        update={
            "bandwidth_mb_s": 5,
            "s3": settings.s3.model_copy(update={"endpoint_url": "http://elsewhere:9000"}),
            "azure": AzureSettings(connection_string=SecretStr("AccountKey=c2VjcmV0")),
        }
    )
    assert list(changed(settings, new)) == [
        "bandwidth_mb_s",
        "s3.endpoint_url",
        "azure.connection_string",
    ]
    assert list(changed(settings, settings.model_copy(deep=True))) == []


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 5 s")


async def cap_in_force(url: str, want: float) -> None:
    for _ in range(100):
        if samples((await scrape(url))[1])["blobferry_bandwidth_cap_bytes_per_second"] == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the cap never became {want}")


async def test_a_reload_caps_running_transfers_and_leaves_the_rest_for_a_restart(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Started uncapped; a reload to 3 MB/s (and 8 MiB blocks) caps a copy at once, and
    names block_size_mb as waiting for a restart; a file that does not load changes
    nothing; a reload to log_level = warning silences the info lines."""
    size = 3 * MiB
    s3_client.put_object(Bucket=bucket, Key="a", Body=payload(size, seed=3))
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}/metrics"
    base = settings.model_copy(update={"metrics_address": address})
    versions: list[Settings | ConfigError] = [
        base.model_copy(update={"bandwidth_mb_s": 3, "block_size_mb": 8}),
        ConfigError("configuration error: bandwidth_mb_s: 'fast' is not a number"),
        base.model_copy(update={"bandwidth_mb_s": 3, "log_level": "warning"}),
    ]

    def load() -> Settings:
        version = versions.pop(0)
        if isinstance(version, ConfigError):
            raise version
        return version

    reloader = Reloader(load)
    with capture_logs() as logs:
        async with running_daemon(base, reloader) as d:
            await cap_in_force(url, 0)
            reloader.ask()
            await cap_in_force(url, 3e6)
            t0 = time.monotonic()
            d.drop("capped.json", job(f"s3://{bucket}/a", f"az://{container}/a"))
            assert (await d.wait_finished("capped.json"))[0] == "done"
            # 3.1 MB at 3 MB/s, less the 0.2 s burst the clock allows; ~0.05 s uncapped.
            assert time.monotonic() - t0 > 0.8
            reloader.ask()
            await until(
                lambda: any(
                    e["event"] == "settings not reloaded; running on as before" for e in logs
                )
            )
            await cap_in_force(url, 3e6)
            reloader.ask()
            await until(lambda: len([e for e in logs if e["event"].startswith("settings ")]) == 3)
            quiet = len(logs)
            d.drop("quiet.json", job(f"s3://{bucket}/a", f"az://{container}/b"))
            assert (await d.wait_finished("quiet.json"))[0] == "done"
            assert [e for e in logs[quiet:] if e["log_level"] == "info"] == []
    reloads = [e for e in logs if e["event"].startswith("settings ")]
    assert [(e["log_level"], e["event"]) for e in reloads] == [
        ("info", "settings reloaded"),
        ("error", "settings not reloaded; running on as before"),
        ("info", "settings reloaded"),
    ]
    assert reloads[0]["applied"] == ["bandwidth_mb_s"]
    assert reloads[0]["after_restart"] == ["block_size_mb"]
    assert reloads[0]["in_force"] == {
        "bandwidth_mb_s": "3",
        "max_transfers": base.max_transfers,
        "memory_mb": base.memory_mb,
        "log_level": "info",
        "keep_days": 30,
    }
    assert reloads[1]["error"] == "configuration error: bandwidth_mb_s: 'fast' is not a number"
    # block_size_mb is back to what the daemon runs with: nothing waits for a restart.
    assert reloads[2]["applied"] == ["log_level"]
    assert reloads[2]["after_restart"] == []
    assert blob_bytes(blob_service, container, "b") == payload(size, seed=3)


async def test_a_reload_changes_how_many_transfers_run_and_cancels_none(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A prefix copies four at a time; a reload to max_transfers = 1 lets the four in
    flight finish and then admits one at a time; a reload to 3 lets three run. Every
    object is copied (none cancelled), and memory_mb's new budget shows at once."""
    size, count = 256 << 10, 24
    for i in range(count):
        s3_client.put_object(Bucket=bucket, Key=f"p/{i:02}", Body=payload(size, seed=i))
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}/metrics"
    # 2 MB/s for all: an object takes 0.13 s alone, 0.5 s four at a time.
    base = settings.model_copy(
        update={"metrics_address": address, "max_transfers": 4, "bandwidth_mb_s": 2}
    )
    versions = [
        base.model_copy(update={"max_transfers": 1, "memory_mb": 8}),  # 8 MiB: two blocks
        base.model_copy(update={"max_transfers": 3}),
    ]
    reloader = Reloader(lambda: versions.pop(0))
    seen: list[tuple[float, ...]] = []  # running, copied, memory budget, bound

    async def sample() -> tuple[float, ...]:
        got = samples((await scrape(url))[1])
        seen.append(
            (
                got["blobferry_transfers_running"],
                got['blobferry_transfers_total{status="copied"}'],
                got["blobferry_memory_budget_bytes"],
                got["blobferry_transfers_max"],
            )
        )
        return seen[-1]

    async def until_sampled(condition: Callable[[tuple[float, ...]], bool]) -> int:
        for _ in range(500):
            if condition(await sample()):
                return len(seen) - 1
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within 5 s: {seen[-10:]}")

    with capture_logs() as logs:
        async with running_daemon(base, reloader) as d:
            d.drop("p.json", job(f"s3://{bucket}/p/", f"az://{container}/p/"))
            await until_sampled(lambda s: s[0] == 4)
            reloader.ask()
            single = await until_sampled(lambda s: s[0] <= 1 and s[2] == 8 * MiB)
            copied = seen[single][1]
            # Three more, one at a time.
            await until_sampled(lambda s: s[1] >= copied + 3)
            alone = seen[single:]
            reloader.ask()
            await until_sampled(lambda s: s[0] == 3)
            folder, report = await d.wait_finished("p.json")
    assert [running for running, *_ in alone] and max(r for r, *_ in alone) == 1
    bounds = [b for *_, b in seen]
    assert [b for i, b in enumerate(bounds) if i == 0 or b != bounds[i - 1]] == [4, 1, 3]
    assert folder == "done", report
    assert report["summary"]["copied"] == count
    reloads = [e for e in logs if e["event"] == "settings reloaded"]
    # The second file leaves memory_mb out: back to the default, which is a change too.
    assert [e["applied"] for e in reloads] == [["max_transfers", "memory_mb"]] * 2
    assert not [e for e in logs if "cancel" in e["event"]]
    for i in range(count):
        assert blob_bytes(blob_service, container, f"p/{i:02}") == payload(size, seed=i)


async def notice(sock: socket.socket, want: str, proc: asyncio.subprocess.Process) -> str:
    """The next sd_notify message holding ``want``, while the daemon lives."""
    loop = asyncio.get_running_loop()
    for _ in range(60):
        assert proc.returncode is None, f"the daemon died: {proc.returncode}"
        with contextlib.suppress(TimeoutError):
            message: str = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.5)).decode()
            if want in message:
                return message
    raise AssertionError(f"no {want} from the daemon")


async def reload(proc: asyncio.subprocess.Process, notify: socket.socket) -> None:
    """SIGHUP, as the unit's ExecReload= sends it; systemd hears RELOADING=1, then
    READY=1 once the settings are in force (or refused)."""
    proc.send_signal(signal.SIGHUP)
    await notice(notify, "RELOADING=1", proc)
    await notice(notify, "READY=1", proc)


async def test_sighup_reloads_the_file_and_tells_systemd(
    tmp_path: Path,
    settings: Settings,
    moto_endpoint: str,
    azurite_endpoint: str,
) -> None:
    """`blobferry run` with a settings file: SIGHUP rereads it (RELOADING=1 then
    READY=1 to systemd), a file that no longer parses keeps the daemon as it was, and
    SIGTERM still drains to exit 0. Before, SIGHUP killed the daemon on the spot."""
    config = tmp_path / "blobferry.toml"
    config.write_text("bandwidth_mb_s = 0\n")
    env = daemon_env(settings, moto_endpoint, azurite_endpoint, BLOBFERRY_CONFIG=str(config))
    async with notified_daemon(env, tmp_path) as (proc, notify):
        await notice(notify, "READY=1", proc)
        config.write_text('bandwidth_mb_s = "08:00,20 19:00,off"\nblock_size_mb = 8\n')
        await reload(proc, notify)
        config.write_text("bandwidth_mb_s = \n")  # not TOML
        await reload(proc, notify)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    reloads = [e for e in lines if e["event"].startswith("settings ")]
    assert [e["event"] for e in reloads] == [
        "settings reloaded",
        "settings not reloaded; running on as before",
    ]
    assert reloads[0]["applied"] == ["bandwidth_mb_s"]
    assert reloads[0]["after_restart"] == ["block_size_mb"]
    assert reloads[0]["in_force"]["bandwidth_mb_s"] == "08:00,20 19:00,off"
    assert str(config) in reloads[1]["error"]
    assert lines[-1]["event"] == "stopped"
