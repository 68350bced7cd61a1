"""The fleet's CloudFormation template (config/blobferry-fleet.yaml): valid, as
cfn-lint (AWS's own linter, with the resource specifications) judges it, and its IAM
role in step with the calls the daemon makes, no more."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "config" / "blobferry-fleet.yaml"
CFN_LINT = str(Path(sys.executable).parent / "cfn-lint")

# botocore operation -> the IAM action that authorises it (Service Authorization
# Reference: SQS's batch calls are authorised by the single call's action; S3's HEAD
# Object by s3:GetObject, HEAD Bucket by s3:ListBucket).
ACTIONS = {
    "receive_message": "sqs:ReceiveMessage",
    "change_message_visibility": "sqs:ChangeMessageVisibility",
    "change_message_visibility_batch": "sqs:ChangeMessageVisibility",
    "delete_message": "sqs:DeleteMessage",
    "get_queue_attributes": "sqs:GetQueueAttributes",
    "send_message": "sqs:SendMessage",
    "head_object": "s3:GetObject",
    "list_objects_v2": "s3:ListBucket",
    "head_bucket": "s3:ListBucket",
}
# s3.py's put_object writes a report only where sqs.results is s3://; the template's
# reports go to Azure, so its role has no write.
NOT_IN_ROLE = {"put_object"}


def _template() -> Any:
    return yaml.safe_load(TEMPLATE.read_text())


def test_cfn_lint_finds_nothing() -> None:
    r = subprocess.run([CFN_LINT, str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_role_allows_what_the_daemon_calls_and_nothing_else() -> None:
    calls = set()
    for module in ("sqs.py", "s3.py"):
        text = (ROOT / "daemon" / module).read_text()
        calls |= set(re.findall(r"self\._client\.([a-z_0-9]+)", text))
    assert calls - NOT_IN_ROLE <= set(ACTIONS), f"a call the table does not know: {calls}"
    needed = {ACTIONS[c] for c in calls - NOT_IN_ROLE}
    needed.add("s3:GetObjectVersion")  # a versioned object's GET names its version
    [policy] = _template()["Resources"]["FleetRole"]["Properties"]["Policies"]
    granted = set()
    for statement in policy["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow"
        action = statement["Action"]
        granted |= {action} if isinstance(action, str) else set(action)
    assert granted == needed


def test_the_queue_dead_letters_and_only_the_bucket_may_send() -> None:
    r = _template()["Resources"]
    assert r["Jobs"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["DeadLetters", "Arn"]
    }
    [statement] = r["JobsPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert set(statement["Condition"]) == {"ArnLike", "StringEquals"}
