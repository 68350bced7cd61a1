"""Queue message bodies as jobs (events.py) and keys to destinations (routing.py)."""

from __future__ import annotations

import json

import pytest

from daemon.errors import ConfigError, JobFileError
from daemon.events import Job, NotAJob, Nothing, decode
from daemon.jobs import parse_job
from daemon.routing import Routes
from daemon.settings import load_settings


def _routes(*tables: dict[str, object]) -> Routes:
    return Routes(load_settings(routes=list(tables)).routes)


def _record(name: str, key: str, bucket: str = "bucket-a") -> str:
    return json.dumps({"Records": [{"eventName": name, "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}]})


ROUTES = _routes(
    {"source": "s3://bucket-a", "destination": "az://all"},
    {"source": "s3://bucket-a/logs/", "destination": "az://logs/raw/", "delete": True, "tier": "Cool"},
)


def test_the_longest_route_wins_and_keys_are_url_decoded() -> None:
    job = decode(_record("ObjectCreated:CompleteMultipartUpload", "logs/2026/a+b%2Bc%3D.gz"), ROUTES)
    assert isinstance(job, Job)
    [spec] = parse_job(job.text)
    assert str(spec.source) == "s3://bucket-a/logs/2026/a b+c=.gz"
    assert str(spec.destination) == "az://logs/raw/2026/a b+c=.gz"
    assert spec.options.tier == "Cool" and spec.options.delete


def test_removals_act_only_on_routes_that_delete() -> None:
    assert isinstance(decode(_record("ObjectRemoved:Delete", "x.bin"), ROUTES), Nothing)
    for name in ("ObjectRemoved:DeleteMarkerCreated", "LifecycleExpiration:Delete"):
        job = decode(_record(name, "logs/x.bin"), ROUTES)
        assert isinstance(job, Job) and parse_job(job.text)[0].options.delete


def test_what_asks_for_nothing_and_what_is_no_job() -> None:
    assert isinstance(decode(_record("ObjectTagging:Put", "x.bin"), ROUTES), Nothing)
    assert isinstance(decode(_record("ObjectCreated:Put", "folder/"), ROUTES), Nothing)
    assert isinstance(decode('{"Event": "s3:TestEvent", "Bucket": "bucket-a"}', ROUTES), Nothing)
    for body, why in (
        (_record("ObjectCreated:Put", "k", bucket="other-bucket"), "no route covers s3://other-bucket/k"),
        ('{"Type": "SubscriptionConfirmation"}', "confirm it in SNS"),
        ("[1]", "not an object"),
        ("\x00", "not JSON"),
        ('{"Records": [{"eventName": "ObjectCreated:Put"}]}', "lacks eventName, bucket or key"),
    ):
        with pytest.raises(NotAJob, match=why):
            decode(body, ROUTES)


def test_sns_around_eventbridge_and_a_job() -> None:
    bridge = {
        "detail-type": "Object Deleted",
        "source": "aws.s3",
        "detail": {"bucket": {"name": "bucket-a"}, "object": {"key": "logs/k v"}},
    }
    job = decode(json.dumps({"Type": "Notification", "Message": json.dumps(bridge)}), ROUTES)
    assert isinstance(job, Job) and str(parse_job(job.text)[0].source) == "s3://bucket-a/logs/k v"
    plain = '{"source": "s3://bucket-b/k", "destination": "az://ctr/k"}'
    assert decode(plain, ROUTES) == Job(plain)


def test_routes_are_checked_as_settings_are_loaded() -> None:
    with pytest.raises(ConfigError, match=r"routes\.0\.source.*ends with /"):
        load_settings(routes=[{"source": "s3://bucket-a/logs", "destination": "az://ccc/"}])
    with pytest.raises(ConfigError, match=r"routes\.0\.destination"):
        load_settings(routes=[{"source": "s3://bucket-a/", "destination": "az://C/"}])
    with pytest.raises(ConfigError, match=r"routes\.0\.overwite: unknown setting"):
        load_settings(routes=[{"source": "s3://bucket-a/", "destination": "az://ccc/", "overwite": "never"}])


def test_delete_follows_one_object_not_a_prefix() -> None:
    with pytest.raises(JobFileError, match="delete follows one object"):
        parse_job('{"source": "s3://bucket-a/p/", "destination": "az://ccc/p/", "delete": true}')
