"""A queue for the fleet tests: moto's SQS with a dead-letter queue behind it (redrive
after ``max_receives``), and a bucket whose notifications moto's S3 sends to it, as
Amazon S3 does (its test event first)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import boto3


@dataclass
class SharedQueue:
    sqs: Any
    url: str
    dlq_url: str
    arn: str

    def drain(self, url: str | None = None) -> list[dict[str, Any]]:
        """Every message waiting (visible) on the queue (or ``url``), received and deleted."""
        out = []
        while True:
            r = self.sqs.receive_message(
                QueueUrl=url or self.url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            got = r.get("Messages", [])
            if not got:
                return out
            for m in got:
                self.sqs.delete_message(QueueUrl=url or self.url, ReceiptHandle=m["ReceiptHandle"])
            out += got

    def counts(self, url: str | None = None) -> tuple[int, int]:
        """(visible, in flight) messages."""
        a = self.sqs.get_queue_attributes(
            QueueUrl=url or self.url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(
            a["ApproximateNumberOfMessagesNotVisible"]
        )


def make_queue(endpoint: str, max_receives: int = 2, visibility_s: int = 30) -> SharedQueue:
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    name = f"q-{uuid.uuid4().hex[:10]}"
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_s),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}
            ),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return SharedQueue(sqs, url, dlq, arn)


def notify(s3_client: Any, bucket: str, queue: SharedQueue) -> None:
    """The bucket's created and removed events go to the queue."""
    s3_client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": queue.arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )


def wait_for(check: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


async def until(check: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    """wait_for, for a test whose daemon runs on its own event loop."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(check)
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")
