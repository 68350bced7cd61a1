"""Several real `blobferry run` processes sharing one queue: objects arriving while they
run (moto's S3 sends the events), one daemon killed with SIGKILL mid-object, objects
written over while they are copied, poison messages, and a prefix job spread over the
fleet. Every blob must end equal to its object's current version.

S3 is read through a counting TCP proxy, to bound what the fleet read in all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from tests.emulators import connection_string, dies_with_this_process
from tests.fleet import SharedQueue, make_queue, notify, until
from tests.helpers import MiB, payload
from tests.proxy import FaultProxy

BLOBFERRY = str(Path(sys.executable).parent / "blobferry")
pytestmark = pytest.mark.slow


def _config(
    path: Path, s3: str, q: SharedQueue, sqs_endpoint: str, results: str, routes: str = ""
) -> Path:
    lines = [
        "max_transfers = 8",
        "memory_mb = 16",
        "block_size_mb = 1",
        "pipe_max_mb = 0",
        "poll_interval_s = 0.2",
        "grace_period_s = 5",
        "[s3]",
        f'endpoint_url = "{s3}"',
        "[retry]",
        "backoff_s = 0.05",
        "backoff_max_s = 0.5",
        "[sqs]",
        f'queue_url = "{q.url}"',
        f'endpoint_url = "{sqs_endpoint}"',
        f'results = "{results}"',
        "wait_s = 1",
        "visibility_s = 10",
        "retry_delay_s = 1",
        "page_keys = 200",
        routes,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def _fleet(tmp: Path, config: Path, azurite: str, n: int, slow_first: bool = False) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    logs = []
    try:
        for i in range(n):
            home = tmp / f"d{i}"
            home.mkdir()
            env = dict(os.environ)
            env.update(
                BLOBFERRY_CONFIG=str(config),
                BLOBFERRY_JOBS_DIR=str(home / "jobs"),
                BLOBFERRY_STATE_DIR=str(home / "state"),
                AZURE_STORAGE_CONNECTION_STRING=connection_string(azurite),
            )
            if slow_first and i == 0:  # mid-object whenever it is killed
                env["BLOBFERRY_BANDWIDTH_MB_S"] = "0.5"
                env["BLOBFERRY_PROGRESS_INTERVAL_S"] = "0.3"
            log = open(home / "log.jsonl", "wb")  # noqa: SIM115 (the process's)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [BLOBFERRY, "run"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=dies_with_this_process(),
                )
            )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _events(tmp: Path, i: int) -> list[dict[str, Any]]:
    out = []
    for line in (tmp / f"d{i}" / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def _ready(tmp: Path, n: int) -> None:
    await until(
        lambda: all(any(e.get("event") == "ready" for e in _events(tmp, i)) for i in range(n)),
        60,
        "every daemon ready",
    )


def _running(tmp: Path, i: int, at_least: int = 0) -> set[str]:
    """The sources daemon ``i`` is copying, with ``at_least`` bytes of each done."""
    db = tmp / f"d{i}" / "state" / "blobferry.sqlite3"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            rows = c.execute(
                "SELECT source FROM transfers WHERE status = 'running' AND bytes_done >= ?",
                (at_least,),
            ).fetchall()
    except sqlite3.Error:
        return set()
    return {r[0] for r in rows}


def _md5s(svc: BlobServiceClient, container: str, prefix: str) -> dict[str, bytes]:
    """Each blob's MD5: its Content-MD5, or (a resumed object's blob has none: the
    blocks an earlier run staged were not read again to hash them) its bytes'."""
    out = {}
    for b in svc.get_container_client(container).list_blobs(name_starts_with=prefix):
        md5 = b.content_settings.content_md5
        if not md5:
            data = svc.get_blob_client(container, b.name).download_blob().readall()
            md5 = hashlib.md5(data).digest()
        out[b.name[len(prefix) :]] = bytes(md5)
    return out


async def test_three_daemons_one_queue_kill_overwrite_poison(
    tmp_path: Path,
    moto_server: str,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    q = make_queue(moto_server, max_receives=5)
    notify(s3_client, bucket, q)
    routes = (
        f'[[routes]]\nsource = "s3://{bucket}/in/"\ndestination = "az://{container}/data/"\n'
    )
    # The current bytes of every key, and every byte ever written (all versions).
    current: dict[str, bytes] = {}
    written = 0
    lock = threading.Lock()

    def put(key: str, body: bytes) -> None:
        nonlocal written
        s3_client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
        with lock:
            current[key] = body
            written += len(body)

    async with FaultProxy(moto_endpoint) as proxy:
        results = f"az://{container}/reports/"
        config = _config(tmp_path / "c.toml", proxy.endpoint, q, moto_server, results, routes)
        with _fleet(tmp_path, config, azurite_endpoint, 3, slow_first=True) as procs:
            await _ready(tmp_path, 3)
            big = {f"big-{i:02d}.bin" for i in range(30)}
            small = [f"small-{i:03d}.txt" for i in range(270)]

            def produce(keys: list[str]) -> None:
                for n, key in enumerate(keys):
                    size = 3 * MiB + n * 997 if key in big else 2000 + 37 * n
                    put(key, payload(size, seed=hash(key) & 0xFFFF))

            order = sorted(big) + small  # the big ones first, so the kill finds one running
            first, second = order[:150], order[150:]
            await asyncio.to_thread(produce, first)
            # Daemon 0 (bandwidth-capped) is killed once it is half-way through one.
            await until(lambda: _running(tmp_path, 0, MiB), 60, "daemon 0 mid-object")
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            # Written over while copying: three versions in quick succession, of keys
            # the dead daemon was not copying (its are to be resumed, as they were).
            held = {s.rsplit("/", 1)[1] for s in _running(tmp_path, 0)}
            for key in [k for k in sorted(big) if k not in held][:5]:
                for v in (1, 2):
                    await asyncio.to_thread(put, key, payload(2 * MiB + v, seed=1000 + v))
            for garbage in ("not json", '{"what": "ever"}', "[1, 2]"):
                q.sqs.send_message(QueueUrl=q.url, MessageBody=garbage)
            await asyncio.to_thread(produce, second)

            want = {k: hashlib.md5(v).digest() for k, v in current.items()}
            try:
                await until(
                    lambda: _md5s(blob_service, container, "data/") == want,
                    90,
                    "every blob equal to its object's current version",
                    every=0.5,
                )
            except AssertionError:
                got = _md5s(blob_service, container, "data/")
                wrong = sorted(k for k in want if got.get(k) != want[k])
                raise AssertionError(f"{len(wrong)} wrong: {wrong[:10]}; {q.counts()}") from None
            await until(lambda: q.counts() == (0, 0), 60, "the queue empty, nothing held")
            dead = await until(lambda: q.counts(q.dlq_url)[0] >= 3 and q.counts(q.dlq_url), 60, "DLQ")
            for p in procs[1:]:
                p.send_signal(signal.SIGTERM)
            for p in procs[1:]:
                assert p.wait(30) == 0
        read = proxy.bytes_down

    # The bytes themselves, not only their MD5s.
    for key, body in current.items():
        blob = blob_service.get_blob_client(container, f"data/{key}").download_blob().readall()
        assert blob == body, key
    assert dead[0] == 3
    # What the fleet read from S3: every version at most once, and the dead daemon's
    # blocks in flight (its budget: memory_mb) again, with headers and the odd copy
    # two daemons made of one version at once.
    assert read <= written * 1.25 + 16 * MiB, (read, written)
    reports = [
        json.loads(blob_service.get_blob_client(container, b.name).download_blob().readall())
        for b in blob_service.get_container_client(container).list_blobs(name_starts_with="reports/")
    ]
    resumed = [t for r in reports for t in r["transfers"] if t.get("blocks_reused")]
    assert resumed, "the killed daemon's object was resumed from the blocks it staged"
    copies = [sum(e.get("event") == "copied" for e in _events(tmp_path, i)) for i in range(3)]
    assert all(copies[1:]), copies  # the survivors both worked
    print(f"fleet: read {read / MiB:.1f} MiB of {written / MiB:.1f} MiB written; copies {copies}; resumed {len(resumed)}")


async def test_a_prefix_job_is_spread_over_three_daemons(
    tmp_path: Path,
    moto_server: str,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    q = make_queue(moto_server)
    n = 2400
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3_client.put_object(Bucket=bucket, Key=f"p/{i:05d}", Body=b"%d" % i), range(n)))
    results = str(tmp_path / "results")
    config = _config(tmp_path / "c.toml", moto_endpoint, q, moto_server, results)
    with _fleet(tmp_path, config, azurite_endpoint, 3) as procs:
        await _ready(tmp_path, 3)
        job = {"source": f"s3://{bucket}/p/", "destination": f"az://{container}/p/"}
        parent = "sqs-" + q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps(job))["MessageId"]
        folder = tmp_path / "results" / parent

        def pages_done() -> bool:
            docs = [json.loads(p.read_text()) for p in folder.glob("*.report.json")]
            return sum(d["summary"]["copied"] for d in docs) == n

        await until(pages_done, 120, "every page copied", every=0.5)
        await until(lambda: q.counts() == (0, 0), 30, "the queue empty")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(30) == 0
    own = json.loads((tmp_path / "results" / f"{parent}.report.json").read_text())
    assert own["status"] == "done" and own["transfers"][0]["spread"]["objects"] == n
    assert len(list(folder.glob("*.report.json"))) == n // 200
    names = {b.name for b in blob_service.get_container_client(container).list_blobs()}
    assert names == {f"p/{i:05d}" for i in range(n)}
    copies = [sum(e.get("event") == "copied" for e in _events(tmp_path, i)) for i in range(3)]
    assert sum(copies) >= n and all(copies), copies  # each daemon took pages
