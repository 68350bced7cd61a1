"""An Azure AD identity instead of a key: bearer tokens on the direct path.

Azurite serves HTTPS with a certificate made here and takes bearer tokens (``--oauth
basic``: it checks each token's issuer, audience and lifetime, not its signature). The
identity is a managed identity as App Service provides one: IDENTITY_ENDPOINT and
IDENTITY_HEADER lead azure-identity's DefaultAzureCredential to a token endpoint this
module runs. blobferry runs as its own process and trusts the certificate through
SSL_CERT_FILE, as a systemd unit would be told to.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import BlobServiceClient, aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemon.addresses import AzAddress
from daemon.azure_direct import Direct
from tests.emulators import connection_string, emulator
from tests.helpers import MiB, blob_bytes, multipart_object, payload
from tests.httpproxy import HttpProxy
from tests.proxy import FaultProxy, Faults
from tests.test_cli import BLOBFERRY, run

STORAGE = "https://storage.azure.com"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own authority, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blobferry test Azurite")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Identity:
    """A managed identity's token endpoint, as App Service runs one. Each token is an
    unsigned JWT for ``audience``; the client is told it lasts ``life_s`` seconds, and
    Azurite refuses it ``grace_s`` seconds after that."""

    def __init__(
        self,
        audience: str = STORAGE,
        life_s: float = 3600,
        grace_s: float = 0,
        outage: range = range(0),
    ) -> None:
        self.audience, self.life_s, self.grace_s = audience, life_s, grace_s
        self.outage = outage  # calls (0 = the first) answered 500: an endpoint that is down
        self.calls = 0
        self.secret = uuid.uuid4().hex  # the X-IDENTITY-HEADER value
        self.issued: list[str] = []
        self.refused = 0  # requests without the identity header
        identity = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                identity.calls += 1
                if identity.calls - 1 in identity.outage:
                    self.send_error(500)
                    return
                if self.headers.get("X-IDENTITY-HEADER") != identity.secret:
                    identity.refused += 1
                    self.send_error(401)
                    return
                resource = parse_qs(urlsplit(self.path).query)["resource"][0]
                body = json.dumps(identity.token(resource)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/msi/token"

    def token(self, resource: str) -> dict[str, str]:
        now = time.time()
        claims = {
            "aud": self.audience,
            "iss": "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
            "iat": int(now) - 60,
            "nbf": int(now) - 60,
            "exp": int(now + self.life_s + self.grace_s),
            "oid": str(uuid.uuid4()),
        }
        token = ".".join(
            base64.urlsafe_b64encode(part).rstrip(b"=").decode()
            for part in (
                json.dumps({"alg": "RS256", "typ": "JWT"}).encode(),
                json.dumps(claims).encode(),
                b"not signed",
            )
        )
        self.issued.append(token)
        return {
            "access_token": token,
            "expires_on": str(int(now + self.life_s)),
            "resource": resource,
            "token_type": "Bearer",
        }

    def __enter__(self) -> Identity:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def azurite_tls(tmp_path_factory: pytest.TempPathFactory, tls: tuple[Path, Path]) -> Iterator[str]:
    log = tmp_path_factory.mktemp("azurite-tls") / "azurite.log"
    with emulator("azurite", log, tls=tls) as endpoint:
        yield endpoint


@dataclass
class Stage:
    """moto, the TLS Azurite, its certificate, the test's own (keyed) client of it, and
    a fresh container there."""

    tmp: Path
    moto: str
    azurite: str
    cert: Path
    service: BlobServiceClient
    container: str

    def env(self, identity: Identity, moto: str | None = None, **extra: str) -> dict[str, str]:
        """blobferry's environment: no key, only the identity's variables."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "BLOBFERRY_"))
        }
        env.update(
            BLOBFERRY_JOBS_DIR=str(self.tmp / "jobs"),
            BLOBFERRY_STATE_DIR=str(self.tmp / "state"),
            BLOBFERRY_S3__ENDPOINT_URL=moto or self.moto,
            BLOBFERRY_AZURE__ACCOUNT_URL=f"{self.azurite}/devstoreaccount1",
            IDENTITY_ENDPOINT=identity.url,
            IDENTITY_HEADER=identity.secret,
            SSL_CERT_FILE=str(self.cert),
        )
        env.update(extra)
        return env

    def blob(self, name: str) -> bytes:
        return blob_bytes(self.service, self.container, name)


@pytest.fixture
def stage(
    tmp_path: Path, moto_endpoint: str, azurite_tls: str, tls: tuple[Path, Path]
) -> Iterator[Stage]:
    with BlobServiceClient.from_connection_string(
        connection_string(azurite_tls), connection_verify=str(tls[0])
    ) as service:
        container = f"ctr-{uuid.uuid4().hex[:12]}"
        service.create_container(container)
        yield Stage(tmp_path, moto_endpoint, azurite_tls, tls[0], service, container)


def copy(env: dict[str, str], source: str, destination: str) -> tuple[int, dict[str, Any], str]:
    """``blobferry copy``: its exit code, its report and everything it printed."""
    proc = run(["copy", source, destination, "--quiet"], env)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def test_an_identity_copies_by_every_route(stage: Stage, s3_client: Any, bucket: str) -> None:
    small, piped = payload(10_000, seed=1), payload(9 * MiB + 5, seed=2)
    s3_client.put_object(Bucket=bucket, Key="id/a-small.bin", Body=small)
    s3_client.put_object(Bucket=bucket, Key="id/b-piped.bin", Body=piped)
    parts = multipart_object(s3_client, bucket, "id/c-parts.bin", 11 * MiB, 5 * MiB)
    with Identity() as identity:
        env = stage.env(identity, BLOBFERRY_PIPE_RTT_MS="1000")  # the route is not tested
        code, report, output = copy(env, f"s3://{bucket}/id/", f"az://{stage.container}/out/")
    assert code == 0, output
    routes = {t["source"].rsplit("/", 1)[1]: t["route"] for t in report["transfers"]}
    assert routes == {"a-small.bin": "whole", "b-piped.bin": "pipe", "c-parts.bin": "blocks"}
    for name, body in (("a-small.bin", small), ("b-piped.bin", piped), ("c-parts.bin", parts)):
        assert stage.blob(f"out/{name}") == body
    # One token served every request: the SDK's policy keeps it until 5 minutes before
    # it expires. No token reaches the report or the logs.
    assert len(identity.issued) == 1 and identity.refused == 0
    assert identity.issued[0] not in output


async def test_tokens_are_renewed_while_a_job_runs(
    stage: Stage, s3_client: Any, bucket: str
) -> None:
    """Tokens said to last 2 s, refused by Azure 4 s after they are issued, and a job of
    several seconds (S3 read at 500 kB/s, one object at a time): it succeeds only if
    blobferry asks for new tokens as it goes. Early on, the token endpoint is down for
    six calls, longer than azure-identity's own three retries: a renewal that fails
    so is retried like any passing fault. It used to fail the transfer as "Azure
    refused the credentials", which Azure never saw."""
    bodies = {f"t/{i:02d}.bin": payload(200_000 + i, seed=i) for i in range(16)}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    async with FaultProxy(stage.moto, Faults(rate_bps=500_000)) as slow_s3:
        with Identity(life_s=2, grace_s=2, outage=range(2, 8)) as identity:
            env = stage.env(identity, slow_s3.endpoint, BLOBFERRY_MAX_TRANSFERS="1")
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                BLOBFERRY,
                "copy",
                f"s3://{bucket}/t/",
                f"az://{stage.container}/t/",
                "--quiet",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            took = time.monotonic() - started
    output = (out + err).decode()
    assert proc.returncode == 0, output
    report = json.loads(out)
    assert took > 6, f"the job took {took:.1f} s, too short to outlive a token"
    assert [t["status"] for t in report["transfers"]] == ["copied"] * len(bodies)
    assert len(identity.issued) >= 3 and identity.calls > identity.outage.stop
    for key, body in bodies.items():
        assert stage.blob(key) == body


async def test_https_goes_through_the_proxy_in_a_connect_tunnel(
    stage: Stage, s3_client: Any, bucket: str
) -> None:
    """Real Azure is https: through an egress proxy that is a CONNECT tunnel, with the
    proxy's login on the CONNECT. Azure's requests (direct and the SDK's) take it from
    HTTPS_PROXY; S3 and the token endpoint, plain http here, go straight. The login
    appears nowhere in the output."""
    small = payload(10_000, seed=3)
    s3_client.put_object(Bucket=bucket, Key="px/a.bin", Body=small)
    parts = multipart_object(s3_client, bucket, "px/b.bin", 11 * MiB, 5 * MiB)
    async with HttpProxy(login=("egress", "pa55word")) as proxy:
        with Identity() as identity:
            env = stage.env(
                identity, HTTPS_PROXY=proxy.endpoint.replace("//", "//egress:pa55word@")
            )
            proc = await asyncio.create_subprocess_exec(
                BLOBFERRY,
                "copy",
                f"s3://{bucket}/px/",
                f"az://{stage.container}/px/",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
    output = (out + err).decode()
    assert proc.returncode == 0, output
    assert stage.blob("px/a.bin") == small and stage.blob("px/b.bin") == parts
    azure = "127.0.0.1:" + stage.azurite.rsplit(":", 1)[1]
    assert proxy.refused == 0 and proxy.seen
    assert set(proxy.seen) == {f"CONNECT {azure}"}
    assert "pa55word" not in output


async def test_a_proxy_refusing_its_login_is_named_and_not_retried(
    stage: Stage, s3_client: Any, bucket: str
) -> None:
    """A wrong password in HTTPS_PROXY: the proxy answers the CONNECT with 407. That was
    "connection failed (ClientHttpProxyError)", retried as if it might pass."""
    s3_client.put_object(Bucket=bucket, Key="px/a.bin", Body=b"x" * 1000)
    async with HttpProxy(login=("egress", "pa55word")) as proxy:
        with Identity() as identity:
            wrong = proxy.endpoint.replace("//", "//egress:n0tThat@")
            proc = await asyncio.create_subprocess_exec(
                BLOBFERRY,
                "copy",
                f"s3://{bucket}/px/a.bin",
                f"az://{stage.container}/px/a.bin",
                env=stage.env(identity, HTTPS_PROXY=wrong),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
    output = (out + err).decode()
    assert proc.returncode == 1, output
    [t] = json.loads(out)["transfers"]
    assert "the egress proxy refused its login (407" in t["error"]
    assert "gave up" not in t["error"] and proxy.refused == 1
    assert "n0tThat" not in output


def test_an_identity_azure_refuses_fails_with_a_reason(
    stage: Stage, s3_client: Any, bucket: str
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"x" * 1000)
    with Identity(audience="https://vault.azure.net") as identity:  # a token for elsewhere
        env = stage.env(identity)
        code, report, output = copy(env, f"s3://{bucket}/k.bin", f"az://{stage.container}/k.bin")
    assert code == 1, output
    [t] = report["transfers"]
    assert t["status"] == "failed"
    assert "Azure refused the credentials" in t["error"] and "identity" in t["error"]
    assert "gave up" not in t["error"]  # refused at once, not retried
    assert list(stage.service.get_container_client(stage.container).list_blobs()) == []
    assert all(token not in output for token in identity.issued)


def test_an_identity_with_no_token_to_give_is_not_called_a_refusal(
    stage: Stage, s3_client: Any, bucket: str
) -> None:
    """The token endpoint fails from the first call on: Azure Storage never saw a
    request, so the reason names the identity, not Azure refusing credentials."""
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"x" * 1000)
    with Identity(outage=range(1000)) as identity:
        code, report, output = copy(
            stage.env(identity), f"s3://{bucket}/k.bin", f"az://{stage.container}/k.bin"
        )
    assert code == 1, output
    [t] = report["transfers"]
    assert "no Azure AD token for this machine's identity" in t["error"]
    assert "Azure refused" not in t["error"] and identity.issued == []


def test_an_identity_needs_https(
    stage: Stage, azurite_endpoint: str, s3_client: Any, bucket: str
) -> None:
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=b"x")
    with Identity() as identity:
        env = stage.env(
            identity, BLOBFERRY_AZURE__ACCOUNT_URL=f"{azurite_endpoint}/devstoreaccount1"
        )
        code, _, output = copy(env, f"s3://{bucket}/k.bin", "az://ctr/k.bin")
    assert code == 2 and "must be https://" in output and "Traceback" not in output
    assert identity.issued == []  # no token was asked for, so none could travel in clear


class Tokens:
    """A token credential that hands out ``tokens`` in turn, the last one for ever."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        token = self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]
        return AccessToken(token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass


async def test_a_refused_token_is_dropped_once() -> None:
    """Azurite never answers 401 (an expired token gets 403 there); Azure does, for a
    token expired early or revoked. Then the direct path asks for a new token and the
    request is retried, however many requests carried the old one; a credential that
    hands the refused token back gets the failure."""
    dst = AzAddress("c", "b")
    async with aio.BlobServiceClient(
        "https://acct.blob.core.windows.net", credential=Tokens("A", "B")
    ) as service:
        direct = Direct(service, None, service._credential_policy)
        _, first = await direct.prepare("PUT", dst, {}, {})
        _, second = await direct.prepare("PUT", dst, {}, {})
        assert first["Authorization"] == second["Authorization"] == "Bearer A"
        assert not direct.refused_before(first) and not direct.refused_before(second)
        assert direct.drop_token(first) and direct.drop_token(second)  # both retried
        _, third = await direct.prepare("PUT", dst, {}, {})
        assert third["Authorization"] == "Bearer B" and not direct.refused_before(third)
    async with aio.BlobServiceClient(
        "https://acct.blob.core.windows.net", credential=Tokens("A")
    ) as service:
        direct = Direct(service, None, service._credential_policy)
        _, first = await direct.prepare("PUT", dst, {}, {})
        assert direct.drop_token(first)
        _, again = await direct.prepare("PUT", dst, {}, {})
        assert again["Authorization"] == "Bearer A" and direct.refused_before(again)
    async with aio.BlobServiceClient.from_connection_string(
        connection_string("http://127.0.0.1:1")
    ) as service:
        direct = Direct(service, None, service._credential_policy)
        _, keyed = await direct.prepare("PUT", dst, {}, {})
        assert not direct.drop_token(keyed)  # a shared key's 401 is simply refused
