"""bandwidth_mb_s: one cap on the bytes a second read from S3, all transfers together,
by time of day if asked, so the service sharing the instance keeps its network."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from daemon.bandwidth import BURST_S, MB, Bandwidth, timetable
from daemon.errors import ConfigError
from daemon.settings import Settings, load_settings
from tests.helpers import MiB, blob_bytes, copy, payload


def test_timetables_and_what_is_wrong_with_them() -> None:
    day = timetable("08:00,20 19:00,off")
    assert day.entries == ((480, 20 * MB), (1140, None))
    # Before 08:00 the evening's "off" still holds; from 08:00 to 18:59, 20 MB/s.
    assert [day.at(m) for m in (0, 479, 480, 1139, 1140, 1439)] == [
        None, None, 20 * MB, 20 * MB, None, None,
    ]  # fmt: skip
    assert timetable("7:30,1.5").at(0) == 1.5 * MB  # one entry holds all day
    assert timetable(12.5).entries == ((0, 12.5 * MB),)
    assert timetable("12.5") == timetable(12.5)
    assert timetable(0).never and timetable("off").never and not day.never
    assert day.describe() == "08:00,20 19:00,off"
    for bad, why in [
        ("", "is empty"),
        ("fast", "'fast' is not a number of MB/s or 'off'"),
        (-1, "-1 is not a number of MB/s"),
        (float("inf"), "inf is not a number of MB/s"),
        ("08:00,20 8am,off", "'8am,off' is not HH:MM,MB/s or Day-HH:MM,MB/s"),
        ("Mon-08:00,20 Fr-19:00,off", "'Fr-19:00,off' is not HH:MM,MB/s or Day-HH:MM,MB/s"),
        ("Mon-08:00,20 Fry-19:00,off", "'Fry-19:00,off': Fry is not a day"),
        ("Mon-08:00,20 08:00,5", "'08:00,5': 'Mon-08:00,20' already gives that time"),
        ("24:00,1", "'24:00,1': 24:00 is not a time of day"),
        ("09:00,1 08:00,2", "'08:00,2': the times must rise through the day"),
        ("08:00,-5", "'-5' is not a number of MB/s"),
    ]:
        with pytest.raises(ValueError, match="^" + why.replace("(", r"\(")):
            timetable(bad)
    # By the week, as rclone's: an entry without a day holds every day at its time.
    week = timetable("Mon-08:00,20; sat-00:00,off 23:00,5")
    assert week.describe() == (
        "Mon-08:00,20 Mon-23:00,5 Tue-23:00,5 Wed-23:00,5 Thu-23:00,5 Fri-23:00,5 "
        "Sat-00:00,off Sat-23:00,5 Sun-23:00,5"
    )
    monday, friday, saturday, sunday = 0, 4 * 1440, 5 * 1440, 6 * 1440
    assert [week.at(m) for m in (
        monday,                    # Sunday 23:00's 5 still holds
        monday + 8 * 60,           # 20 from Monday 08:00
        monday + 23 * 60,          # 5 from Monday 23:00, each night
        friday + 12 * 60,          # and so on to Friday noon
        saturday + 12 * 60,        # off from Saturday 00:00
        sunday + 23 * 60 + 59,     # 5 again from Saturday 23:00 (nights are capped)
    )] == [5 * MB, 20 * MB, 5 * MB, 5 * MB, None, 5 * MB]  # fmt: skip
    assert timetable(week.describe()) == week
    with pytest.raises(ConfigError) as e:
        load_settings(None, bandwidth_mb_s="08:00,20 19:00,of")
    assert str(e.value) == (
        "configuration error: bandwidth_mb_s: 'of' is not a number of MB/s or 'off'"
    )


async def test_one_clock_paces_every_reader_and_follows_the_timetable() -> None:
    """Four readers taking 64 KiB chunks share 8 MB/s; when the timetable turns the cap
    off, nobody waits."""
    minute = [600]
    cap = Bandwidth(timetable("09:00,8 10:30,off"), lambda: minute[0])
    chunk = 64 * 1024
    total = 4 * 32 * chunk  # 8.4 MB: about a second at 8 MB/s

    async def reader() -> None:
        for _ in range(32):
            await cap.take(chunk)

    t0 = time.monotonic()
    await asyncio.gather(*(reader() for _ in range(4)))
    took = time.monotonic() - t0
    assert cap.rate() == 8 * MB
    assert took >= total / (8 * MB) - BURST_S
    minute[0] = 630
    cap._checked = -1.0  # the next take reads the timetable, as it would a second later
    t0 = time.monotonic()
    await asyncio.gather(*(reader() for _ in range(4)))
    assert cap.rate() is None
    assert time.monotonic() - t0 < 0.1


async def test_a_capped_copy_keeps_to_the_cap_on_every_route(
    settings: Settings,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """A small object (whole), a piped one and one in blocks copy together under one
    cap of 6 MB/s: the copy takes at least as long as the cap allows, every blob is
    byte for byte, and the pipe, whose Put Blob waits on capped reads, is not cut as
    stalled though each wait is longer than the stall timeout."""
    bodies = {
        "small.bin": payload(1 * MiB, seed=1),
        "piped.bin": payload(6 * MiB, seed=2),
        "blocks.bin": payload(9 * MiB, seed=3),
    }
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=f"src/{key}", Body=body)
    capped = settings.model_copy(
        update={
            "bandwidth_mb_s": 6,
            "pipe_max_mb": 8,
            "pipe_rtt_ms": 1000.0,
            "block_size_mb": 1,
            "retry": settings.retry.model_copy(update={"stall_timeout_s": 0.3, "attempts": 1}),
        }
    )
    total = sum(map(len, bodies.values()))
    t0 = time.monotonic()
    status, rows = await copy(capped, f"s3://{bucket}/src/", f"az://{container}/dst/")
    took = time.monotonic() - t0
    assert status == "done", [r.error for r in rows]
    assert {r.source.rsplit("/", 1)[1]: r.detail["route"] for r in rows} == {
        "small.bin": "whole",
        "piped.bin": "pipe",
        "blocks.bin": "blocks",
    }
    for key, body in bodies.items():
        assert blob_bytes(blob_service, container, f"dst/{key}") == body
    # At most the burst and one chunk per reader (11 at once, aiohttp's at most
    # 256 KiB each) come ahead of the cap.
    assert took >= (total - 11 * 256 * 1024) / (6 * MB) - BURST_S, took


async def test_saturated_while_readers_wait_on_the_cap() -> None:
    """What a queue asks before it takes another job: a daemon at its cap leaves new
    work to the rest of the fleet, and takes it again once its reading keeps up."""
    bw = Bandwidth(timetable(10))  # 10 MB/s
    assert not bw.saturated()
    await bw.take(1 * MB)  # 0.1 s of the cap: within the burst
    assert not bw.saturated()
    reader = asyncio.ensure_future(bw.take(5 * MB))  # half a second more: it waits
    await asyncio.sleep(0)
    assert bw.saturated()
    await reader
    await asyncio.sleep(BURST_S)
    assert not bw.saturated()
    assert not Bandwidth(timetable(0)).saturated()  # no cap, never
