"""config/blobferry.service as systemd would run it, as far as this machine allows."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient

from tests.conftest import make_settings
from tests.emulators import ROOT, free_port
from tests.helpers import MiB, blob_bytes, payload
from tests.sandbox import Sandbox
from tests.test_faults import daemon_env, notified_daemon, wait_report
from tests.test_metrics import samples, scrape
from tests.test_reload import notice, reload

UNIT = ROOT / "config" / "blobferry.service"


def test_the_sandbox_is_enforced() -> None:
    """The rebuilt filters bite: a call the unit takes away (setting CPU affinity, in
    @resources) is refused or kills, and a socket family it leaves out is refused."""
    sandbox = Sandbox.of_unit(UNIT)
    assert sandbox.allowed and "sched_setaffinity" not in sandbox.allowed
    probe = (
        "import os, socket\n"
        "print('started', flush=True)\n"
        "try:\n"
        "    os.sched_setaffinity(0, {0})\n"
        "    print('affinity set')\n"
        "except OSError as e:\n"
        "    print('affinity refused', e.errno)\n"
        "try:\n"
        "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "except OSError as e:\n"
        "    print('packet refused', e.errno)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, preexec_fn=sandbox.enter
    )
    if sandbox.refusal is None:
        assert run.returncode == -signal.SIGSYS and run.stdout == "started\n"
    else:
        assert f"affinity refused {sandbox.refusal}" in run.stdout, run.stdout + run.stderr
        assert "packet refused 97" in run.stdout  # EAFNOSUPPORT


async def test_the_daemon_serves_inside_the_units_system_call_sandbox(
    tmp_path: Path,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Under systemd, a system call the unit does not allow kills the daemon (SIGSYS)
    unless SystemCallErrorNumber= turns it into an error. awscrt, which botocore
    imports, loads libnuma, whose start-up probes set_mempolicy (in @resources, which
    the unit takes away): the daemon died on import before it could log a line. Here
    the unit's own filters wrap a daemon that resolves host names, watches its inbox,
    copies on the one-request and the block route, talks to systemd, serves its
    metrics, reloads on SIGHUP and drains on SIGTERM."""
    local = {e: e.replace("127.0.0.1", "localhost") for e in (moto_endpoint, azurite_endpoint)}
    settings = make_settings(tmp_path, local[moto_endpoint], local[azurite_endpoint])
    sizes = {"small.bin": 1000, "large.bin": 9 * MiB}
    for key, size in sizes.items():
        s3_client.put_object(Bucket=bucket, Key=f"in/{key}", Body=payload(size))
    env = daemon_env(
        settings,
        local[moto_endpoint],
        local[azurite_endpoint],
        WATCHDOG_USEC="1000000",
        BLOBFERRY_METRICS_ADDRESS=(metrics := f"127.0.0.1:{free_port()}"),
    )
    async with notified_daemon(env, tmp_path, Sandbox.of_unit(UNIT)) as (proc, notify):
        await notice(notify, "READY=1", proc)
        inbox = settings.jobs_dir / "inbox"
        (inbox / ".j.tmp").write_text(
            json.dumps({"source": f"s3://{bucket}/in/", "destination": f"az://{container}/"})
        )
        (inbox / ".j.tmp").rename(inbox / "j.json")
        report = await wait_report(settings.jobs_dir, "j", timeout=60)
        _, text = await scrape(f"http://{metrics}/metrics")
        assert samples(text)['blobferry_transfers_total{status="copied"}'] == 2
        await reload(proc, notify)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert report["status"] == "done", report
    for key, size in sizes.items():
        assert blob_bytes(blob_service, container, key) == payload(size)
