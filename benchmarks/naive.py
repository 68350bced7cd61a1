"""The method from the problem statement, as people first write it: presign the S3
object, open it with requests(stream=True), hand the stream to the synchronous
BlobClient.upload_blob. One object at a time.

    python -m benchmarks.naive BUCKET PREFIX CONTAINER DEST_PREFIX
"""

from __future__ import annotations

import os
import sys

import boto3
import requests
from azure.storage.blob import BlobServiceClient


def main() -> int:
    bucket, prefix, container, dest = sys.argv[1:5]
    s3 = boto3.client("s3", endpoint_url=os.environ["NAIVE_S3_ENDPOINT"], region_name="us-east-1")
    svc = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            url = s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": obj["Key"]}, ExpiresIn=3600
            )
            with requests.get(url, stream=True, timeout=300) as r:
                r.raise_for_status()
                blob = svc.get_blob_client(container, dest + obj["Key"][len(prefix) :])
                blob.upload_blob(r.raw, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
