"""The SDK's way of making the requests azure_direct.py makes around it (``azure.direct
= false``), and the SDK's keyword form of a write's precondition, which the requests
that always go through the SDK (commit, delete) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import StandardBlobTier
from azure.storage.blob.aio import BlobClient

from daemon.addresses import AzAddress
from daemon.azure_errors import error_code
from daemon.blockcheck import BlockCheck
from daemon.chunks import Chunks
from daemon.errors import BlobChangedError, DestinationExistsError
from daemon.properties import BlobHeaders
from daemon.seams import ExistingBlob, Precondition


class SdkPath:
    """Get Blob Properties, Put Blob and Put Block through the SDK (azure.direct =
    false). Azure still checks each body against its MD5 or CRC64 (as the direct path
    sends them); the body is joined into one buffer first, which the direct path never
    does."""

    def __init__(self, blob: BlobClient, error: Callable[[AzureError, AzAddress, str], Exception]):
        self._blob = blob
        self._error = error

    async def existing(self, dst: AzAddress) -> ExistingBlob | None:
        try:
            props = await self._blob.get_blob_properties()
        except ResourceNotFoundError as e:
            if error_code(e) == "ContainerNotFound":
                raise self._error(e, dst, "read properties") from None
            return None
        except AzureError as e:
            raise self._error(e, dst, "read properties") from None
        return ExistingBlob(
            size=props.size, metadata=dict(props.metadata or {}), etag=props.etag or ""
        )

    async def put(
        self,
        dst: AzAddress,
        data: Chunks,
        check: BlockCheck,
        headers: BlobHeaders,
        metadata: dict[str, str],
        when: Precondition,
        tier: str | None,
    ) -> None:
        try:
            await self._blob.upload_blob(
                data.join(),
                length=data.size,
                overwrite=not when.absent,
                content_settings=headers.settings(check.md5),
                metadata=metadata,
                standard_blob_tier=StandardBlobTier(tier) if tier else None,
                headers=check.headers(),  # Azure checks the bytes on arrival
                **conditions(when),
            )
        except ResourceExistsError:
            raise DestinationExistsError(dst) from None
        except HttpResponseError as e:
            if e.status_code == 412:
                raise refused(when, dst) from None
            raise self._error(e, dst, "put blob") from None
        except AzureError as e:
            raise self._error(e, dst, "put blob") from None

    async def stage(self, dst: AzAddress, block_id: str, data: Chunks, check: BlockCheck) -> None:
        try:
            await self._blob.stage_block(block_id, data.join(), data.size, headers=check.headers())
        except AzureError as e:
            raise self._error(e, dst, f"stage block {block_id}") from None


def conditions(when: Precondition) -> dict[str, Any]:
    """A Precondition as the SDK's keyword arguments."""
    if when.absent:
        return {"match_condition": MatchConditions.IfMissing}
    if when.etag:
        return {"etag": when.etag, "match_condition": MatchConditions.IfNotModified}
    return {}


def refused(when: Precondition, dst: AzAddress) -> Exception:
    """A 412: absence asked for and a blob there, or an ETag named and changed."""
    return DestinationExistsError(dst) if when.absent else BlobChangedError(dst)
