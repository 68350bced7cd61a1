"""`make demo`: the whole thing on a local default, then everything stopped.

Starts moto (S3) and Azurite (Azure Blob) on free ports, puts sample objects in a
bucket, starts `blobferry run` with a jobs folder under ./demo-run, drops a sample
job into its inbox, waits for the report, checks every blob byte for byte against
its object, prints the report, and stops the daemon (SIGTERM) and both emulators.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
from azure.storage.blob import BlobServiceClient

from tests.emulators import ROOT, connection_string, dies_with_this_process, emulator

MiB = 1024 * 1024
BUCKET, CONTAINER = "blobferry-demo", "demo"


def sample_objects(s3: object) -> dict[str, bytes]:
    objects = {
        "reports/2026-11-25/summary.json": json.dumps({"rows": 12345}).encode(),
        "reports/2026-11-25/app.log.gz": gzip.compress(b"line\n" * 200_000, mtime=0),
        "reports/2026-11-25/empty.txt": b"",
        "reports/2026-11-25/data file (final) +1.bin": os.urandom(3 * MiB),
        "reports/2026-11-25/big.bin": os.urandom(40 * MiB),
    }
    objects.update(
        {f"reports/2026-11-25/parts/part-{i:02d}.csv": os.urandom(20_000 + i) for i in range(20)}
    )
    for key, body in objects.items():
        extra = {"ContentEncoding": "gzip"} if key.endswith(".gz") else {}
        s3.put_object(Bucket=BUCKET, Key=key, Body=body, Metadata={"origin": "demo"}, **extra)  # type: ignore[attr-defined]
    return objects


class Daemon:
    """`blobferry run` as a process of this Python; scripts/image.py runs it in the image."""

    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.log_path = run_dir / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(env, run_dir),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_this_process(),
        )

    def command(self, env: dict[str, str], run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "daemon", "run"]

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._log.close()
        return self.proc.returncode


def main(daemon: type[Daemon] = Daemon) -> int:
    run_dir = ROOT / "demo-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    with (
        emulator("moto", run_dir / "moto.log") as s3_url,
        emulator("azurite", run_dir / "azurite.log") as az_url,
    ):
        print(f"S3 emulator (moto) at {s3_url}, Azure emulator (Azurite) at {az_url}")
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID="demo",
            AWS_SECRET_ACCESS_KEY="demo",
            AWS_DEFAULT_REGION="us-east-1",
            BLOBFERRY_S3__ENDPOINT_URL=s3_url,
            AZURE_STORAGE_CONNECTION_STRING=connection_string(az_url),
            BLOBFERRY_JOBS_DIR=str(run_dir / "jobs"),
            BLOBFERRY_STATE_DIR=str(run_dir / "state"),
        )
        os.environ.update(
            {
                k: env[k]
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            }
        )
        s3 = boto3.client("s3", endpoint_url=s3_url)
        s3.create_bucket(Bucket=BUCKET)
        objects = sample_objects(s3)
        blobs = BlobServiceClient.from_connection_string(connection_string(az_url))
        blobs.create_container(CONTAINER)
        print(
            f"put {len(objects)} sample objects ({sum(map(len, objects.values())) / MiB:.1f} MiB) in s3://{BUCKET}/"
        )

        (run_dir / "jobs" / "inbox").mkdir(parents=True)
        running = daemon(env, run_dir)
        try:
            job = {
                "transfers": [
                    {
                        "source": f"s3://{BUCKET}/reports/2026-11-25/",
                        "destination": f"az://{CONTAINER}/ingest/2026-11-25/",
                    },
                ]
            }
            inbox = run_dir / "jobs" / "inbox"
            inbox.mkdir(parents=True, exist_ok=True)
            (inbox / ".sample.json.tmp").write_text(json.dumps(job, indent=2))
            os.rename(inbox / ".sample.json.tmp", inbox / "sample.json")
            print(f"dropped {inbox / 'sample.json'}; waiting for the daemon ...")
            deadline = time.monotonic() + 300
            report_path = None
            while report_path is None and time.monotonic() < deadline:
                for folder in ("done", "failed"):
                    p = run_dir / "jobs" / folder / "sample.report.json"
                    if p.exists():
                        report_path = p
                if running.proc.poll() is not None:
                    raise SystemExit(
                        f"the daemon exited with {running.proc.returncode}; see {running.log_path}"
                    )
                time.sleep(0.2)
            if report_path is None:
                raise SystemExit("the job did not finish in time")
        finally:
            exit_code = running.stop()
        report = json.loads(report_path.read_text())
        print(json.dumps(report, indent=2))
        wrong = []
        for key, body in objects.items():
            name = "ingest/2026-11-25/" + key.removeprefix("reports/2026-11-25/")
            got = blobs.get_blob_client(CONTAINER, name).download_blob(decompress=False).readall()
            if got != body:
                wrong.append(name)
        print(f"daemon log: {running.log_path} (JSON lines); daemon exit code {exit_code}")
        if report["status"] != "done" or wrong or exit_code != 0:
            print(f"FAILED: status {report['status']}, wrong blobs: {wrong}, exit {exit_code}")
            return 1
        print(f"OK: {len(objects)} objects copied, every blob equal to its object byte for byte")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
