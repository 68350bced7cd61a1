"""1, 2 and 3 daemons on one queue, through the WAN delay line.

    python -m benchmarks.fleet --rounds 3

moto serves S3 and SQS, Azurite (a fresh one a run) serves Blob; S3 and Azure are
reached through benchmarks/wanproxy.py (20 ms one way, 8 MB/s per connection each way),
SQS directly (a queue is in the instances' region). Each run starts N `blobferry run`
processes on one queue, waits until all are ready, sends one prefix job and times it
until the reports of every page it was spread into (sqs.page_keys keys each) account
for every object; every blob is then checked against its object's MD5. With --per-daemon-mb-s each
daemon is capped as an instance's network card would cap it. CPU is the
daemons' own (user + system, from /proc), summed; the emulators' and proxies' beside
it. All of it shares this machine's cores: that, not the link, is what caps more
daemons here. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
from azure.storage.blob import BlobServiceClient

from benchmarks.run import (
    BIN,
    BUCKET,
    ROOT,
    Scenario,
    _cpu,
    _env_cpu,
    _ready,
    check,
    fill,
    wan,
    warm_s3,
    warm_up,
)
from tests.emulators import PIDS, connection_string, dies_with_this_process, emulator

MiB = 1024 * 1024
# wan-many's objects (small ones, which a far link makes slow one at a time) and a
# few larger ones, which go as blocks.
FLEET = Scenario("fleet", "moto", "fleet/", (48 * 1024,) * 400 + (16 * MiB,) * 6, wan=True)
PAGE_KEYS = 40
PAGE_MB = 16  # each large object a page of its own, as sqs.page_mb does at scale


def run_fleet(
    n: int, s3: str, sqs: str, work: Path, md5s: dict[str, str], rnd: int, cap: float
) -> dict[str, Any]:
    moto_url = sqs
    with emulator("azurite", work / f"azurite-{n}-{rnd}.log") as az_direct, wan(az_direct) as az:
        svc = BlobServiceClient.from_connection_string(connection_string(az_direct))
        warm_up(svc)
        container = f"fleet-{n}-{rnd}"
        svc.create_container(container)
        client: Any = boto3.client(
            "sqs", endpoint_url=sqs, region_name="us-east-1",
            aws_access_key_id="bench", aws_secret_access_key="bench",
        )  # fmt: skip
        queue = client.create_queue(
            QueueName=f"fleet-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "60"}
        )["QueueUrl"]
        results = work / f"results-{n}-{rnd}"
        with ExitStack() as stack:
            procs = []
            for i in range(n):
                home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bf-fleet-")))
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
                sock.bind(str(home / "notify"))
                sock.settimeout(0.2)
                env = {
                    "PATH": "/usr/bin:/bin",
                    "HOME": str(home),
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true",
                    "NOTIFY_SOCKET": str(home / "notify"),
                    "BLOBFERRY_LOG_LEVEL": "warning",
                    "BLOBFERRY_JOBS_DIR": str(home / "jobs"),
                    "BLOBFERRY_STATE_DIR": str(home / "state"),
                    "BLOBFERRY_S3__ENDPOINT_URL": s3,
                    "AZURE_STORAGE_CONNECTION_STRING": connection_string(az),
                    "BLOBFERRY_SQS__QUEUE_URL": queue,
                    "BLOBFERRY_SQS__ENDPOINT_URL": sqs,
                    "BLOBFERRY_SQS__WAIT_S": "1",
                    "BLOBFERRY_SQS__RESULTS": str(results),
                    "BLOBFERRY_SQS__PAGE_KEYS": str(PAGE_KEYS),
                    "BLOBFERRY_SQS__PAGE_MB": str(PAGE_MB),
                    "BLOBFERRY_BANDWIDTH_MB_S": str(cap),
                }
                proc = subprocess.Popen(
                    [str(BIN / "blobferry"), "run"],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=dies_with_this_process(),
                )
                procs.append(proc)
                if not _ready(sock, proc):
                    raise RuntimeError(f"daemon {i} did not start")
            cpu0 = [_cpu(p.pid) for p in procs]
            env0 = _env_cpu()
            each0 = {url: _cpu(pid) for url, pid in PIDS.items()}
            job = {
                "source": f"s3://{BUCKET}/{FLEET.prefix}",
                "destination": f"az://{container}/out/",
                "overwrite": "always",
            }
            t0 = time.monotonic()
            parent = (
                "sqs-"
                + client.send_message(QueueUrl=queue, MessageBody=json.dumps(job))["MessageId"]
            )
            copied = 0
            while copied < len(FLEET.sizes):
                if time.monotonic() - t0 > 600:
                    raise RuntimeError("the fleet took over 10 minutes")
                time.sleep(0.02)
                copied = sum(
                    json.loads(p.read_text())["summary"]["copied"]
                    for p in (results / parent).glob("*.report.json")
                )
            seconds = time.monotonic() - t0
            cpu = sum(_cpu(p.pid) - c for p, c in zip(procs, cpu0, strict=True))
            env_cpu = _env_cpu() - env0
            names = {moto_url: "moto", az_direct: "azurite", s3: "wan-s3", az: "wan-azure"}
            cores = {
                names.get(url, url): round((_cpu(pid) - each0[url]) / seconds, 2)
                for url, pid in PIDS.items()
                if url in each0
            }
            cores["daemons"] = round(cpu / seconds, 2)
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
        problem = check(svc, container, "out/", FLEET, md5s)
    size = sum(FLEET.sizes)
    return {
        "daemons": n,
        "round": rnd,
        "seconds": seconds,
        "mbps": size / 1e6 / seconds,
        "objps": len(FLEET.sizes) / seconds,
        "cpu_per_gib": cpu / (size / 2**30),
        "env_cpu_per_gib": env_cpu / (size / 2**30),
        "cores": cores,
        "problem": problem,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--daemons", default="1,2,3")
    p.add_argument(
        "--per-daemon-mb-s",
        type=float,
        default=0,
        help="each daemon's bandwidth_mb_s: an instance's network card, where the "
        "instance, not the emulators, is what caps one daemon (0: none)",
    )
    a = p.parse_args()
    counts = [int(x) for x in a.daemons.split(",")]
    work = Path(tempfile.mkdtemp(prefix="blobferry-fleet-"))
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        moto = stack.enter_context(emulator("moto", work / "moto.log"))
        print("filling moto ...", flush=True)
        md5s = fill(moto, "moto", [FLEET])
        warm_s3(moto, FLEET)
        s3 = stack.enter_context(wan(moto))
        for r in range(a.rounds):
            for n in counts[r % len(counts) :] + counts[: r % len(counts)]:
                row = run_fleet(n, s3, moto, work, md5s, r + 1, a.per_daemon_mb_s)
                rows.append(row)
                print(
                    f"{n} daemon(s) round {r + 1}: {row['mbps']:6.1f} MB/s {row['objps']:6.1f} "
                    f"obj/s  CPU {row['cpu_per_gib']:5.1f} s/GiB  emulators "
                    f"{row['env_cpu_per_gib']:5.1f} s/GiB  cores {row['cores']}  "
                    f"{row['problem'] or 'ok'}",
                    flush=True,
                )
    print()
    size = sum(FLEET.sizes)
    print(
        f"{len(FLEET.sizes)} objects, {size / MiB:.0f} MiB, pages of {PAGE_KEYS} keys or {PAGE_MB} MiB, "
        f"bandwidth_mb_s {a.per_daemon_mb_s or 'none'} a daemon; medians [min-max]"
    )
    base = None
    for n in counts:
        mine = [r for r in rows if r["daemons"] == n and not r["problem"]]
        if not mine:
            print(f"{n}: no good run")
            continue
        obj = [r["objps"] for r in mine]
        mb = [r["mbps"] for r in mine]
        cpu = statistics.median(r["cpu_per_gib"] for r in mine)
        env = statistics.median(r["env_cpu_per_gib"] for r in mine)
        base = base or statistics.median(obj)
        print(
            f"{n} daemon(s): {statistics.median(obj):6.1f} obj/s [{min(obj):.1f}-{max(obj):.1f}]  "
            f"{statistics.median(mb):6.1f} MB/s [{min(mb):.1f}-{max(mb):.1f}]  "
            f"x{statistics.median(obj) / base:.2f} of one  CPU {cpu:.1f} s/GiB  "
            f"emulators {env:.1f} s/GiB"
        )
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / f"fleet-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
