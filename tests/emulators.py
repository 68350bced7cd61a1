"""Start and stop the emulators: moto's S3 server and Azurite. Used by the test fixtures
and by the demo, each on free ports, each stopped when done."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# endpoint URL -> PID of the emulator serving it, for the benchmark's CPU accounting
PIDS: dict[str, int] = {}
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for the servers and daemons that tests, the demo and the bench
    start: the child is killed when this process dies, however it dies (SIGKILL, CI's
    timeout), instead of running on (Linux's PR_SET_PDEATHSIG; None elsewhere)."""
    if sys.platform != "linux":
        return None
    parent = os.getpid()

    def arm() -> None:  # in the child, between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)

    return arm


def _start(
    cmd: list[str], port: int, what: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            preexec_fn=dies_with_this_process(),
        )
    try:
        wait_for_port(port, proc, what)
    except BaseException:
        proc.kill()
        raise
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # both emulators keep state in memory only
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def azurite_command(port: int) -> list[str]:
    exe = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        found = shutil.which("azurite-blob")
        if found is None:
            raise RuntimeError("Azurite is not installed: run `make setup` (npm ci)")
        exe = Path(found)
    return [
        str(exe),
        "--inMemoryPersistence",
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--skipApiVersionCheck",
        "--loose",
    ]


def connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={key};BlobEndpoint={endpoint}/devstoreaccount1;"
    )


def moto_command(port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]


def s3rver_command(port: int, data: Path) -> list[str]:
    """s3rver serves ranges from files, where moto copies the object on every GET."""
    exe = ROOT / "node_modules" / ".bin" / "s3rver"
    return [str(exe), "-d", str(data), "-p", str(port), "-a", "127.0.0.1", "--silent"]


@contextmanager
def emulator(kind: str, log: Path, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Run ``moto``, ``azurite`` or ``s3rver`` on a free port; yields its endpoint URL.
    ``tls`` (certificate, key): Azurite over HTTPS, accepting Azure AD bearer tokens too."""
    port = free_port()
    env = None
    if kind == "moto":
        cmd = moto_command(port)
    elif kind == "azurite":
        cmd = azurite_command(port)
        if tls is not None:
            cmd += ["--cert", str(tls[0]), "--key", str(tls[1]), "--oauth", "basic"]
    else:
        data = log.parent / "s3rver-data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = s3rver_command(port, data)
        # Without it s3rver's ListObjectsV2 continuation tokens fail on OpenSSL 3 (its
        # cipher is one OpenSSL 3 keeps in the legacy provider): every second page 500s.
        env = dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider")
    proc = _start(cmd, port, kind, log, env)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    try:
        yield url
    finally:
        PIDS.pop(url, None)
        _stop(proc)
