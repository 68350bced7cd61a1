"""How blobferry signs in to Azure: a connection string, an account URL with a key or
a SAS token, or nothing (then azure-identity's DefaultAzureCredential: a managed
identity on Azure, a workload identity, the az CLI's login elsewhere). The SDK's
service client is built here, sharing the session and the proxy the direct path uses.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from azure.core.exceptions import AzureError
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from azure.storage.blob.aio import BlobServiceClient

from daemon.addresses import account_name
from daemon.azure_errors import TokenError
from daemon.errors import PermanentError
from daemon.proxies import Proxies
from daemon.settings import Settings

Policy = SharedKeyCredentialPolicy | AsyncBearerTokenCredentialPolicy[Any, Any] | None


async def open_service(
    settings: Settings, transport: AioHttpTransport, proxies: Proxies, stack: AsyncExitStack
) -> tuple[BlobServiceClient, Policy]:
    """The SDK's service client for the configured account, opened on ``stack``, and
    the credential policy that signs its requests (the direct path signs with it)."""
    a = settings.azure
    kwargs: dict[str, Any] = {
        "transport": transport,
        "retry_total": 0,  # one retry layer: retry.py
        "connection_timeout": settings.retry.connect_timeout_s,
        "read_timeout": settings.retry.stall_timeout_s,
        "max_single_put_size": 4000 * 1024 * 1024,
    }
    if a.connection_string is not None:
        cs = a.connection_string.get_secret_value()
        # A client that sends nothing, only to read the endpoint the string names.
        _route(proxies, BlobServiceClient.from_connection_string(cs).url, kwargs)
        service = BlobServiceClient.from_connection_string(cs, **kwargs)
    elif a.account_url is not None:
        _route(proxies, a.account_url, kwargs)
        credential: Any
        if a.account_key is not None:
            name = account_name(a.account_url)
            credential = {"account_name": name, "account_key": a.account_key.get_secret_value()}
        elif a.sas_token is not None:
            credential = a.sas_token.get_secret_value()
        else:
            credential = await stack.enter_async_context(_Identity())
        service = BlobServiceClient(a.account_url, credential=credential, **kwargs)
    else:
        raise PermanentError("no Azure account configured")
    await stack.enter_async_context(service)
    policy = service._credential_policy
    if not (
        policy is None
        or isinstance(policy, (SharedKeyCredentialPolicy, AsyncBearerTokenCredentialPolicy))
    ):
        raise PermanentError(f"unsupported Azure credential ({type(policy).__name__})")
    return service, policy


def _route(proxies: Proxies, account_url: str, kwargs: dict[str, Any]) -> None:
    """The SDK's requests take the proxy (if any) the direct path takes."""
    proxy = proxies.route(account_url)
    if proxy is not None:
        kwargs["proxies"] = {account_url.partition("://")[0]: str(proxy)}


class _Identity:
    """azure-identity's DefaultAzureCredential, its failures raised as TokenError.

    A token endpoint down for a moment when a token is due (hourly, on a copy of days)
    is a passing fault, retried, not "Azure refused the credentials".
    Once a source has given a token, azure-identity asks it alone, and its errors keep
    the endpoint's HTTP status; the first time, the chain's error does not."""

    def __init__(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        self._inner = DefaultAzureCredential()

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        try:
            return await self._inner.get_token(*scopes, **kwargs)
        except AzureError as e:
            raise TokenError(e) from None

    async def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        try:
            return await self._inner.get_token_info(*scopes, options=options)
        except AzureError as e:
            raise TokenError(e) from None

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> _Identity:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)
