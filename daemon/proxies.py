"""Which HTTP proxy a request goes through: HTTPS_PROXY, HTTP_PROXY and NO_PROXY
(either case), as botocore reads them for the HEADs and LISTs, and rclone and AzCopy
for everything. An instance in a private subnet often reaches S3 and Azure only so.

aiohttp reads these only with ``trust_env``, which costs a thread hop per request and
also adds ~/.netrc credentials as an Authorization header, which would break a
presigned URL. So they are read here, once per origin (the environment does not
change under a running daemon). A proxy's login stays in its URL, from which aiohttp
makes the Proxy-Authorization header (on the request, or on the CONNECT for https);
the URL is never logged.
"""

from __future__ import annotations

from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from daemon.errors import PermanentError, RetryableError, TransferError


class Proxies:
    def __init__(self) -> None:
        self._by_origin: dict[str, URL | None] = {}

    def route(self, url: str) -> URL | None:
        """The proxy for ``url``, its login in it; None to go straight there."""
        scheme, _, rest = url.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}"
        try:
            return self._by_origin[origin]
        except KeyError:
            found = self._by_origin[origin] = _lookup(origin)
            return found


def _lookup(origin: str) -> URL | None:
    try:
        proxy, auth = get_env_proxy_for_url(URL(origin))
    except LookupError:  # none for this scheme, or NO_PROXY names the host
        return None
    if auth is not None:
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return proxy


def refused_by_proxy(status: int, where: str) -> TransferError:
    """The egress proxy answered ``status`` instead of passing a request on (to a
    CONNECT, or to a plain-http request): what to fix, and whether it may pass."""
    if status == 407:
        return PermanentError(
            f"{where}: the egress proxy refused its login (407 Proxy Authentication "
            "Required); check the user and password in HTTPS_PROXY / HTTP_PROXY"
        )
    if status >= 500 or status == 429:
        return RetryableError(f"{where}: the egress proxy answered {status}")
    return PermanentError(
        f"{where}: the egress proxy refused the connection ({status}); its rules must "
        "let this host through, or NO_PROXY must name it"
    )
