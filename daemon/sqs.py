"""The SQS queue, as the daemon uses it: receive (long polling), keep hidden, release,
delete, send. Calls go through aiobotocore with the same credentials chain as S3;
botocore's own retries are off and blobferry's (retry.py) are the one layer.

SQS delivers at least once: a message may come twice, to two daemons at once, and
comes back when its visibility timeout passes before it is deleted. Everything above
this module is written for that (see transfer.py, the conditional commit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from daemon.errors import PermanentError, RetryableError
from daemon.retry import retrying
from daemon.settings import Settings

PARENT = "blobferry-parent"  # a message attribute: the job a page was spread from
_RETRYABLE = {"ServiceUnavailable", "InternalError", "ThrottlingException", "RequestThrottled"}
_RETRYABLE |= {"KmsThrottled", "AWS.SimpleQueueService.RequestThrottled"}


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    receipt: str
    body: str
    receives: int  # ApproximateReceiveCount: 1 the first time
    sent_at: float  # epoch seconds (SentTimestamp)
    parent: str | None = None  # the job this page was spread from


class Queue:
    """One queue. Use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        s = settings.sqs
        assert s.queue_url is not None, "a queue is made only when one is set"
        self.url = s.queue_url
        self._settings = settings
        self._region = s.region or settings.s3.region
        self._endpoint = s.endpoint_url
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> Queue:
        session = get_session()
        if self._settings.s3.profile:
            session.set_config_variable("profile", self._settings.s3.profile)
        config = AioConfig(
            region_name=self._region,
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self._settings.retry.connect_timeout_s,
            # A long poll holds the request up to wait_s before SQS answers.
            read_timeout=self._settings.sqs.wait_s + self._settings.retry.stall_timeout_s,
            max_pool_connections=8,
        )
        self._client = await self._stack.enter_async_context(
            session.create_client("sqs", endpoint_url=self._endpoint, config=config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _call(self, what: str, call: Callable[..., Awaitable[Any]], **args: Any) -> Any:
        async def once() -> Any:
            try:
                return await call(QueueUrl=self.url, **args)
            except ClientError as e:
                raise _explain(e, what, self.url) from None
            except (NoCredentialsError, PartialCredentialsError):
                raise PermanentError(
                    f"SQS {what}: no AWS credentials found (environment, profile or instance role)"
                ) from None
            except BotoCoreError as e:
                raise RetryableError(f"SQS {what}: {e}") from None

        return await retrying(once, self._settings.retry, f"SQS {what}")

    async def max_receives(self) -> int | None:
        """The redrive policy's maxReceiveCount: a message received that many times goes
        to the dead-letter queue on its next receive. None: the queue has none."""
        r = await self._call(
            "GetQueueAttributes", self._client.get_queue_attributes, AttributeNames=["All"]
        )
        policy = r.get("Attributes", {}).get("RedrivePolicy")
        if not policy:
            return None
        return int(json.loads(policy)["maxReceiveCount"])

    async def receive(self, most: int, wait_s: int, hidden_s: int) -> list[Message]:
        r = await self._call(
            "ReceiveMessage",
            self._client.receive_message,
            MaxNumberOfMessages=max(1, min(most, 10)),
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=hidden_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=[PARENT],
        )
        out = []
        for m in r.get("Messages", ()):
            attrs = m.get("Attributes", {})
            parent = m.get("MessageAttributes", {}).get(PARENT, {}).get("StringValue")
            out.append(
                Message(
                    m["MessageId"],
                    m["ReceiptHandle"],
                    m.get("Body", ""),
                    int(attrs.get("ApproximateReceiveCount", 1)),
                    int(attrs.get("SentTimestamp", time.time() * 1000)) / 1000,
                    parent,
                )
            )
        return out

    async def hide(self, messages: list[Message], seconds: int) -> list[Message]:
        """Keep ``messages`` hidden ``seconds`` from now; returns those SQS refused (a
        receipt no longer valid: the message went back to the queue meanwhile)."""
        lost: list[Message] = []
        for at in range(0, len(messages), 10):
            batch = {str(i): m for i, m in enumerate(messages[at : at + 10])}
            r = await self._call(
                "ChangeMessageVisibilityBatch",
                self._client.change_message_visibility_batch,
                Entries=[
                    {"Id": i, "ReceiptHandle": m.receipt, "VisibilityTimeout": seconds}
                    for i, m in batch.items()
                ],
            )
            lost += [batch[f["Id"]] for f in r.get("Failed", ())]
        return lost

    async def release(self, message: Message, delay_s: int = 0) -> None:
        """Back to the queue, visible again after ``delay_s``."""
        await self._call(
            "ChangeMessageVisibility",
            self._client.change_message_visibility,
            ReceiptHandle=message.receipt,
            VisibilityTimeout=delay_s,
        )

    async def delete(self, message: Message) -> None:
        await self._call(
            "DeleteMessage", self._client.delete_message, ReceiptHandle=message.receipt
        )

    async def send(self, body: str, parent: str | None = None) -> str:
        attributes = (
            {PARENT: {"DataType": "String", "StringValue": parent}} if parent is not None else {}
        )
        r = await self._call(
            "SendMessage",
            self._client.send_message,
            MessageBody=body,
            MessageAttributes=attributes,
        )
        return str(r["MessageId"])


def _explain(e: ClientError, what: str, url: str) -> Exception:
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _RETRYABLE or status >= 500:
        return RetryableError(f"SQS {what}: {code or status}")
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return PermanentError(f"SQS {what}: no queue at {url} (sqs.queue_url)")
    if code in ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId"):
        return PermanentError(
            f"SQS {what}: access denied ({code}); the credentials need sqs:{what} on {url}"
        )
    if code in ("ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight"):
        return PermanentError(f"SQS {what}: {code}: the message went back to the queue meanwhile")
    return PermanentError(f"SQS {what}: {code or status}: {err.get('Message', '')}".strip())
