"""The S3 side's detour around botocore: each range GET presigned here, locally.

Why: botocore's generate_presigned_url costs about a millisecond of CPU per URL (its
endpoint rules and request pipeline run every time); a block of 4 MiB on the many
scenario of the benchmark was spending more on its URL than on its bytes. A URL must
still be signed just before each request (temporary credentials end, and with them
every URL they signed), so it is signed here, with sigv4.py, in microseconds.

botocore resolves a bucket's URL once (endpoint rules, addressing style, region) by
presigning a placeholder key; after that each URL is signed locally with the client's
current credentials (frozen anew each time, so refreshed instance-role credentials are
used as soon as botocore has them). Anything unexpected in the resolved URL and the
bucket is presigned by botocore every time instead; so is every bucket with
``s3.local_signing = false``. tests/test_signer.py pins the signatures to botocore's
own and to AWS CRT's, so an upgrade that changes either fails there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from daemon.errors import RetryableError
from daemon.sigv4 import UrlShape, presign_get, signing_key


class QuerySigner:
    """SigV4 query presigning of object GETs, done here for each request.

    A URL must be signed for the bucket's own region, which need not be the configured
    one: botocore follows the redirect for its own calls, but a presigned URL is only
    refused (AuthorizationQueryParametersError). So the bucket's region is asked once
    (HEAD bucket, which names it even when it refuses) and a bucket elsewhere is signed
    by a client of its region, from ``regional``.
    """

    PLACEHOLDER = "__blobferry_key__"

    def __init__(
        self,
        client: Any,
        expires: int,
        regional: Callable[[str], Awaitable[Any]] | None = None,
        local: bool = True,
    ) -> None:
        self._client = client
        self._expires = expires
        self._regional = regional
        self._local = local  # False: botocore presigns every URL
        self._learnt: dict[str, asyncio.Future[tuple[Any, UrlShape | None]]] = {}
        self._known: dict[str, tuple[Any, UrlShape | None]] = {}  # what they taught
        self._keys: dict[tuple[str, str, str], bytes] = {}

    async def url(
        self, bucket: str, key: str, now: datetime | None = None, version_id: str | None = None
    ) -> str:
        """A GET of the key (of that version, if one is named), presigned now. The URL
        is encoded already: send it as it stands (see ``sigv4.presign_get``)."""
        client, shape = self._known.get(bucket) or await self._learning(bucket)
        if shape is None:
            return await self._botocore(client, bucket, key, version_id)
        credentials = client._get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        creds = await credentials.get_frozen_credentials()
        return self.sign(
            shape, key, creds.access_key, creds.secret_key, creds.token, now, version_id
        )

    async def _learning(self, bucket: str) -> tuple[Any, UrlShape | None]:
        """The first transfer from a bucket learns it; the others wait for that."""
        learnt = self._learnt.get(bucket)
        if learnt is None or (learnt.done() and (learnt.cancelled() or learnt.exception())):
            learnt = self._learnt[bucket] = asyncio.ensure_future(self._learn(bucket))
        self._known[bucket] = known = await asyncio.shield(learnt)
        return known

    async def _botocore(
        self, client: Any, bucket: str, key: str, version_id: str | None = None
    ) -> str:
        params = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        url: str = await client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self._expires
        )
        return url

    async def region(self, bucket: str) -> str | None:
        """The bucket's region, as S3 names it in a HEAD bucket's answer (a refusal and
        a redirect name it too); None when it is not named (no such bucket)."""
        try:
            response = await self._client.head_bucket(Bucket=bucket)
        except ClientError as e:
            response = e.response
        except (NoCredentialsError, PartialCredentialsError):
            raise
        except BotoCoreError as e:  # the connection or the credentials' renewal: retried
            raise RetryableError(f"s3://{bucket}: HEAD bucket: {e}") from None
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        named: str | None = headers.get("x-amz-bucket-region")
        return named

    async def _learn(self, bucket: str) -> tuple[Any, UrlShape | None]:
        client = self._client
        if self._regional is not None:
            region = await self.region(bucket)
            if region and region != client.meta.region_name:
                client = await self._regional(region)
        return client, await self._shape(client, bucket)

    async def _shape(self, client: Any, bucket: str) -> UrlShape | None:
        if not self._local:
            return None
        url = urlsplit(await self._botocore(client, bucket, self.PLACEHOLDER))
        query = dict(parse_qsl(url.query))
        scope = query.get("X-Amz-Credential", "").split("/")
        if (
            query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256"
            or query.get("X-Amz-SignedHeaders") != "host"
            or len(scope) != 5
            or url.path.count(self.PLACEHOLDER) != 1
            or set(query) - _SIGV4_PARAMS
        ):
            return None
        before, after = url.path.split(self.PLACEHOLDER)
        return UrlShape(url.scheme, url.netloc, before, after, scope[2], scope[3])

    def sign(
        self,
        shape: UrlShape,
        key: str,
        access_key: str,
        secret_key: str,
        token: str | None,
        now: datetime | None = None,
        version_id: str | None = None,
    ) -> str:
        return presign_get(
            shape,
            key,
            access_key,
            token,
            self._expires,
            now or datetime.now(UTC),
            lambda day: self._signing_key(secret_key, day, shape),
            version_id,
        )

    def _signing_key(self, secret: str, day: str, shape: UrlShape) -> bytes:
        cache_key = (secret, day, shape.region)
        found = self._keys.get(cache_key)
        if found is None:
            found = signing_key(secret, day, shape.region, shape.service)
            self._keys = {cache_key: found}  # one day, one secret: keep only the latest
        return found


_SIGV4_PARAMS = {
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
}
