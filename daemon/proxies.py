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
