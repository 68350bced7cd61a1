"""What a queue message says, as a job: a message body is a job in the job-file format,
an S3 event notification, the same wrapped by SNS, or S3's event as EventBridge sends
it. Anything else is refused with the reason (NotAJob), and the queue's redrive policy
takes it to the dead-letter queue.

Events are hints: they arrive late, twice and out of order. So an event is never
acted on by what it says of the object (its size, ETag or sequencer) but turned into a
transfer of the key, which reads what S3 holds when it runs; the conditional commit
(transfer.py) orders the writers. On a route with ``delete``, created and removed
events alike become a transfer with ``delete``: the blob follows S3 whichever
arrived last.

Formats, from the AWS documentation: "Event message structure" (S3 User Guide, keys
URL-encoded with ``+`` for a space; ``s3:TestEvent`` on configuration), "Amazon SNS
message and JSON formats" (``Type: Notification``, the event as a string in
``Message``) and "EventBridge event message structure" (``detail-type``, the key in
``detail.object.key``, which EventBridge does not URL-encode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from daemon.routing import Routes

_CREATED = ("ObjectCreated:", "ObjectRestore:Completed")
_REMOVED = ("ObjectRemoved:", "LifecycleExpiration:")
_BRIDGE_CREATED = ("Object Created", "Object Restore Completed")
_BRIDGE_REMOVED = ("Object Deleted",)


class NotAJob(Exception):
    """A message that cannot be made a job; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    bucket: str
    key: str
    removed: bool


@dataclass(frozen=True, slots=True)
class Job:
    """The job a message comes to: its text in the job-file format; ``skipped`` says
    what of the message it leaves out, and why; ``objects``, how many objects it
    names (None: a prefix, as many as it holds)."""

    text: str
    skipped: tuple[str, ...] = ()
    objects: int | None = 1


@dataclass(frozen=True, slots=True)
class Nothing:
    """A message that asks for nothing (a test event, keys its route leaves out)."""

    reason: str


def decode(body: str | bytes, routes: Routes) -> Job | Nothing:
    """The job ``body`` asks for, or Nothing; NotAJob when it is none of the formats."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise NotAJob(f"the message body is not JSON ({len(body)} bytes)") from None
    if not isinstance(doc, dict):
        raise NotAJob("the message body is JSON but not an object")
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return decode(doc["Message"], routes)  # SNS, around any of the others
    if doc.get("Type") == "SubscriptionConfirmation":
        raise NotAJob("an SNS subscription confirmation: confirm it in SNS, not here")
    if doc.get("Event") == "s3:TestEvent":
        return Nothing("S3's test event, sent when a bucket's notifications are set")
    if isinstance(doc.get("Records"), list):
        return _job(list(_records(doc["Records"])), routes)
    if "detail-type" in doc and doc.get("source") == "aws.s3":  # before a job's "source"
        return _job(_bridge(doc), routes)
    if "source" in doc or "transfers" in doc:
        text = body if isinstance(body, str) else body.decode()
        return Job(text, objects=_objects(doc))  # parsed (and refused) as a job file
    raise NotAJob(
        "the message is none of: a job, an S3 event notification, SNS's wrapping of one, "
        f"EventBridge's S3 event (its fields: {', '.join(sorted(map(str, doc))[:8])})"
    )


def _records(records: list[Any]) -> list[ObjectEvent]:
    out = []
    for i, r in enumerate(records):
        try:
            name = str(r["eventName"])
            bucket = str(r["s3"]["bucket"]["name"])
            key = unquote_plus(str(r["s3"]["object"]["key"]))
        except (KeyError, TypeError):
            raise NotAJob(f"S3 event record {i} lacks eventName, bucket or key") from None
        if name.startswith(_CREATED):
            out.append(ObjectEvent(bucket, key, removed=False))
        elif name.startswith(_REMOVED):
            out.append(ObjectEvent(bucket, key, removed=True))
        # Tagging, ACL, replication and transition events change no byte: nothing to do.
    return out


def _bridge(doc: dict[str, Any]) -> list[ObjectEvent]:
    kind = doc["detail-type"]
    try:
        bucket = str(doc["detail"]["bucket"]["name"])
        key = str(doc["detail"]["object"]["key"])
    except (KeyError, TypeError):
        raise NotAJob(
            "EventBridge S3 event lacks detail.bucket.name or detail.object.key"
        ) from None
    if kind in _BRIDGE_CREATED:
        return [ObjectEvent(bucket, key, removed=False)]
    if kind in _BRIDGE_REMOVED:
        return [ObjectEvent(bucket, key, removed=True)]
    return []


def _job(events: list[ObjectEvent], routes: Routes) -> Job | Nothing:
    """One transfer per key the events name, by its route. A key no route holds refuses
    the whole message: copying the rest would leave that one silently behind."""
    transfers: dict[tuple[str, str], dict[str, Any]] = {}
    skipped = []
    for e in events:
        route = routes.find(e.bucket, e.key)
        where = f"s3://{e.bucket}/{e.key}"
        if route is None:
            raise NotAJob(f"no route covers {where}; add a [[routes]] for it")
        if e.key.endswith("/"):
            skipped.append(f"{where}: a folder marker, not an object")
        elif not route.admits(e.key):
            skipped.append(f"{where}: left out by its route's include/exclude")
        elif e.removed and not route.options.delete:
            skipped.append(f"{where}: removed, and its route does not delete")
        else:
            transfers[(e.bucket, e.key)] = {
                "source": where,
                "destination": str(route.place(e.key)),
                **route.options.doc(),
            }
    if not transfers:
        return Nothing("; ".join(skipped) or "the event names no object")
    text = json.dumps({"transfers": list(transfers.values())})
    return Job(text, tuple(skipped), len(transfers))


def _objects(doc: dict[str, Any]) -> int | None:
    """How many objects a job names; None when one of its sources is a prefix."""
    items = doc.get("transfers")
    sources = (
        [t.get("source") for t in items if isinstance(t, dict)]
        if isinstance(items, list)
        else [doc.get("source")]
    )
    if any(not isinstance(s, str) or s.endswith("/") or s.count("/") < 3 for s in sources):
        return None
    return max(1, len(sources))
