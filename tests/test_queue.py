"""The daemon on a queue, in this process: S3's own event notifications (moto's S3 sends
them to moto's SQS), SNS and EventBridge wrappings, jobs, poison, deletes and a prefix
spread as pages, against Azurite."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient

from tests.conftest import make_settings, running_daemon
from tests.emulators import free_port
from tests.fleet import make_queue, notify, until
from tests.helpers import MiB, blob_bytes, blob_names, payload


def _event(kind: str, bucket: str, key: str) -> dict[str, Any]:
    return {"Records": [{"eventName": kind, "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}]}


async def test_events_jobs_poison_and_deletes(
    tmp_path: Path,
    moto_server: str,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    q = make_queue(moto_server, max_receives=2)
    notify(s3_client, bucket, q)
    port = free_port()
    results = tmp_path / "results"
    settings = make_settings(
        tmp_path,
        moto_endpoint,
        azurite_endpoint,
        metrics_address=f"127.0.0.1:{port}",
        sqs={
            "queue_url": q.url,
            "endpoint_url": moto_server,
            "wait_s": 1,
            "visibility_s": 10,
            "retry_delay_s": 0,
            "results": str(results),
            "page_keys": 3,
        },
        routes=[
            {"source": f"s3://{bucket}/in/", "destination": f"az://{container}/in/", "delete": True},
            {
                "source": f"s3://{bucket}/plain/",
                "destination": f"az://{container}/flat/",
                "exclude": ["*.tmp"],
                "metadata": {"origin": "queue"},
            },
        ],
    )
    hostile = "in/a b+c&d=é%20.txt"
    bodies = {
        hostile: payload(1000, seed=1),
        "in/big.bin": payload(9 * MiB, seed=2),
        "plain/x.tmp": b"left out",
        "plain/sns.txt": b"by sns",
        "plain/eb.txt": b"by eventbridge",
    }
    async with running_daemon(settings):
        for key in (hostile, "in/big.bin", "plain/x.tmp"):
            s3_client.put_object(Bucket=bucket, Key=key, Body=bodies[key])
        s3_client.put_object(Bucket=bucket, Key="elsewhere/unrouted.txt", Body=b"no route")
        # Sent by hand: the other wrappings, a job, and two that are no job at all.
        s3_client.put_object(Bucket=bucket, Key="plain/sns.txt", Body=bodies["plain/sns.txt"])
        s3_client.put_object(Bucket=bucket, Key="plain/eb.txt", Body=bodies["plain/eb.txt"])
        inner = json.dumps(_event("ObjectCreated:Put", bucket, "plain/sns.txt"))
        q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps({"Type": "Notification", "Message": inner}))
        bridge = {
            "detail-type": "Object Created",
            "source": "aws.s3",
            "detail": {"bucket": {"name": bucket}, "object": {"key": "plain/eb.txt"}},
        }
        q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps(bridge))
        # A prefix job, of a bucket that sends no events: spread as pages of 3 keys.
        quiet = f"{bucket}-quiet"
        s3_client.create_bucket(Bucket=quiet)
        for i in range(7):
            s3_client.put_object(Bucket=quiet, Key=f"many/{i}.txt", Body=f"object {i}".encode())
        job = {"source": f"s3://{quiet}/many/", "destination": f"az://{container}/many/"}
        q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps(job))
        q.sqs.send_message(QueueUrl=q.url, MessageBody="this is not json")
        q.sqs.send_message(QueueUrl=q.url, MessageBody='{"hello": "world"}')

        want = sorted(
            [f"in/{hostile[3:]}", "in/big.bin", "flat/sns.txt", "flat/eb.txt"]
            + [f"many/{i}.txt" for i in range(7)]
        )
        await until(lambda: blob_names(blob_service, container) == want, 60, "every blob")
        for key, body in bodies.items():
            if key.startswith("in/"):
                assert blob_bytes(blob_service, container, key) == body
        assert blob_bytes(blob_service, container, "flat/sns.txt") == b"by sns"
        props = blob_service.get_blob_client(container, "flat/eb.txt").get_blob_properties()
        assert props.metadata["origin"] == "queue"

        # Poison: refused twice, then the redrive policy moves it to the dead-letter queue.
        dead = await until(
            lambda: (got := q.counts(q.dlq_url))[0] >= 3 and got, 60, "three in the DLQ"
        )
        assert dead[0] == 3
        dead_bodies = sorted(m["Body"][:10] for m in q.drain(q.dlq_url))
        assert dead_bodies == sorted(['{"Records"', "this is no", '{"hello": '])

        # Removed from S3: the blob goes (its route deletes); a removed key on a route
        # that does not delete, and one whose blob blobferry did not write, stay.
        blob_service.get_blob_client(container, "in/stranger.bin").upload_blob(b"mine")
        s3_client.put_object(Bucket=bucket, Key="in/stranger.bin", Body=b"x")
        s3_client.delete_object(Bucket=bucket, Key=hostile)
        s3_client.delete_object(Bucket=bucket, Key="plain/sns.txt")
        await until(
            lambda: f"in/{hostile[3:]}" not in blob_names(blob_service, container), 30, "deleted"
        )
        assert "flat/sns.txt" in blob_names(blob_service, container)

        # Every message handled: none waits, none is held.
        await until(lambda: q.counts() == (0, 0), 30, "queue empty")
        url = f"http://127.0.0.1:{port}/metrics"
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())

    reports = sorted(results.rglob("*.report.json"))
    docs = [json.loads(p.read_text()) for p in reports]
    assert all(p.name.startswith("sqs-") for p in reports)
    spread = [d for d in docs if d["transfers"] and d["transfers"][0]["status"] == "spread"]
    assert len(spread) == 1 and spread[0]["transfers"][0]["spread"]["objects"] == 7
    pages = list((results / spread[0]["job"]).glob("*.report.json"))
    assert len(pages) == 3  # 7 keys, 3 a page
    copied_pages = sum(
        t["status"] == "copied" for p in pages for t in json.loads(p.read_text())["transfers"]
    )
    assert copied_pages == 7
    deleted = [t for d in docs for t in d["transfers"] if t["status"] == "deleted"]
    assert [t["source"] for t in deleted] == [f"s3://{bucket}/{hostile}"]
    poison = [d for d in docs if d["status"] == "failed"]
    assert any("no route covers" in (d.get("error") or "") for d in poison)
    for line in ("received", "deleted", "dead_lettered", "ignored"):
        assert f'blobferry_queue_messages_total{{event="{line}"}}' in metrics
    dead_lettered = next(
        ln for ln in metrics.splitlines() if ln.startswith('blobferry_queue_messages_total{event="dead_lettered"}')
    )
    assert dead_lettered.endswith(" 3")


async def test_a_drain_releases_what_it_does_not_finish_at_once(
    tmp_path: Path,
    moto_server: str,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """Stopped mid-job (SIGTERM's stop), past its grace period: the message goes back to
    the queue at once, not after its visibility timeout (60 s here), and the job's
    blocks stay staged for whoever takes it next."""
    q = make_queue(moto_server, visibility_s=60)
    s3_client.put_object(Bucket=bucket, Key="slow.bin", Body=payload(24 * MiB, seed=5))
    settings = make_settings(
        tmp_path,
        moto_endpoint,
        azurite_endpoint,
        bandwidth_mb_s=4,
        memory_mb=4,  # a 4 MiB block at a time, each a second at 4 MB/s
        grace_period_s=0.5,
        sqs={"queue_url": q.url, "endpoint_url": moto_server, "wait_s": 1, "visibility_s": 60},
    )
    job = {"source": f"s3://{bucket}/slow.bin", "destination": f"az://{container}/slow.bin"}
    async with running_daemon(settings) as d:
        q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps(job))
        await until(lambda: q.counts() == (0, 1), 20, "the message taken")
        await asyncio.sleep(2.5)  # two or three blocks of six staged
        d.stop.set()
        await asyncio.wait_for(d.task, 10)
    assert q.counts() == (1, 0)  # visible again at once
    [m] = q.sqs.receive_message(QueueUrl=q.url, AttributeNames=["All"])["Messages"]
    assert json.loads(m["Body"]) == job
    staged = blob_service.get_blob_client(container, "slow.bin").get_block_list("uncommitted")[1]
    assert staged, "the blocks that landed wait for the next daemon"


async def test_pages_bound_keys_bytes_and_text(
    tmp_path: Path, moto_server: str, moto_endpoint: str, azurite_endpoint: str
) -> None:
    """A prefix's objects go back on the queue in pages of at most page_keys keys and
    page_mb of objects (a larger object alone), each within SQS's 256 KiB a message."""
    from daemon.jobs import make_spec
    from daemon.sources.queue import Pages
    from daemon.sqs import Queue

    q = make_queue(moto_server)
    settings = make_settings(
        tmp_path, moto_endpoint, azurite_endpoint,
        sqs={"queue_url": q.url, "endpoint_url": moto_server},
    )  # fmt: skip
    long = "k" * 900
    specs = [make_spec(f"s3://bucket-a/{long}{i:04d}", f"az://ccc/{long}{i:04d}") for i in range(700)]
    sizes = [10] * 690 + [3 * MiB] * 10
    async with Queue(settings) as queue:
        pages = Pages(queue, "sqs-parent", page_keys=500, page_bytes=2 * MiB)
        await pages.put(specs, sizes)
    got = []
    for m in q.drain():
        assert len(m["Body"].encode()) <= 256 * 1024
        got.append([t["source"][-4:] for t in json.loads(m["Body"])["transfers"]])
    assert sum(len(p) for p in got) == 700 and max(len(p) for p in got) < 500  # the text bound
    big = [p for p in got if len(p) == 1 and int(p[0]) >= 690]
    assert len(big) == 10  # each large object alone
    assert pages.sent == len(got)


async def test_reports_to_an_s3_prefix(
    tmp_path: Path,
    moto_server: str,
    moto_endpoint: str,
    azurite_endpoint: str,
    s3_client: Any,
    blob_service: BlobServiceClient,
    bucket: str,
    container: str,
) -> None:
    """sqs.results = s3://...: the report is an object (through the strict S3 front,
    signed as S3 checks), written before the message is deleted; and the folder's jobs
    run beside the queue's."""
    q = make_queue(moto_server)
    s3_client.put_object(Bucket=bucket, Key="k.txt", Body=b"hello")
    settings = make_settings(
        tmp_path,
        moto_endpoint,
        azurite_endpoint,
        sqs={
            "queue_url": q.url,
            "endpoint_url": moto_server,
            "wait_s": 1,
            "results": f"s3://{bucket}/reports/",
        },
    )
    job = {"source": f"s3://{bucket}/k.txt", "destination": f"az://{container}/k.txt"}
    async with running_daemon(settings) as d:
        sent = q.sqs.send_message(QueueUrl=q.url, MessageBody=json.dumps(job))["MessageId"]
        key = f"reports/sqs-{sent}.report.json"
        # The folder still serves beside the queue, cancel requests and all.
        folder_job = {"source": f"s3://{bucket}/k.txt", "destination": f"az://{container}/f.txt"}
        d.drop("f.json", json.dumps(folder_job))
        (settings.jobs_dir / "cancel" / "nothing.json").write_text("")
        where, folder_report = await d.wait_finished("f.json", 30)
        assert where == "done" and folder_report["summary"]["copied"] == 1

        def reported() -> bool:
            listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="reports/")
            return any(o["Key"] == key for o in listed.get("Contents", ()))

        await until(reported, 30, "the report in S3")
        await until(lambda: q.counts() == (0, 0), 30, "the message deleted")
    report = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert report["status"] == "done" and report["transfers"][0]["status"] == "copied"
    assert blob_bytes(blob_service, container, "k.txt") == b"hello"
