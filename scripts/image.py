"""`make image`: build the Docker image, then run `make demo` with the daemon inside it.

This machine has no Docker engine, so the image is built and run with buildah (vfs
storage, chroot isolation; needs root): the Dockerfile unchanged, the daemon as the
image's non-root user, its jobs folder mounted from ./demo-run/jobs, the emulators on
the host's loopback. No registry is needed: unless BASE names a Python image, the base
is made from Debian packages with debootstrap. Behind a TLS-inspecting proxy the host's
CA bundle (SSL_CERT_FILE) is mounted for the build's pip and uv, as build arguments
only. With a Docker engine, `docker build -t blobferry .` builds the same image.

    apt-get install buildah debootstrap      # once
    make image                               # or: BASE=python:3.11-slim-bookworm make image
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.demo import Daemon, main
from tests.emulators import ROOT

BUILDAH = ["buildah", "--storage-driver", "vfs"]
IMAGE = "localhost/blobferry:dev"
DEBIAN_BASE = "localhost/blobferry-base:bookworm"
CA = "/etc/ssl/certs/ca-certificates.crt"  # where Debian's tools look for it


def sh(*args: str, quiet: bool = False) -> str:
    done = subprocess.run(args, check=True, text=True, stdout=subprocess.PIPE)
    if not quiet:
        print(done.stdout, end="")
    return done.stdout.strip()


def debian_base() -> str:
    """A bookworm root with python3 (3.11, as python:3.11-slim-bookworm), as an image."""
    if DEBIAN_BASE in sh(*BUILDAH, "images", "--format", "{{.Name}}:{{.Tag}}", quiet=True):
        return DEBIAN_BASE
    with tempfile.TemporaryDirectory(prefix="blobferry-rootfs-") as root:
        print(f"debootstrap: bookworm with python3 into {root} ...", flush=True)
        packages = "--include=python3,python3-venv,ca-certificates"
        mirror = "http://deb.debian.org/debian"
        subprocess.run(
            ["debootstrap", "--variant=minbase", packages, "bookworm", root, mirror],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        work = sh(*BUILDAH, "from", "scratch", quiet=True)
        try:
            sh(*BUILDAH, "copy", "--quiet", work, root, "/", quiet=True)
            path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            sh(*BUILDAH, "config", "--env", f"PATH={path}", work, quiet=True)
            sh(*BUILDAH, "commit", "--quiet", work, DEBIAN_BASE, quiet=True)
        finally:
            sh(*BUILDAH, "rm", work, quiet=True)
    return DEBIAN_BASE


def build() -> None:
    base = os.environ.get("BASE") or debian_base()
    args = ["bud", "--isolation", "chroot", "--build-arg", f"BASE={base}", "-t", IMAGE]
    ca = os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        args += ["-v", f"{ca}:{CA}:ro", "--build-arg", f"PIP_CERT={CA}"]
        args += ["--build-arg", f"SSL_CERT_FILE={CA}"]
    print(f"building {IMAGE} from {base} ...", flush=True)
    subprocess.run([*BUILDAH, *args, str(ROOT)], check=True, stdout=subprocess.DEVNULL)


class ImageDaemon(Daemon):
    """`blobferry run` in a container of the image, as its own non-root user."""

    PASSED = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "BLOBFERRY_S3__ENDPOINT_URL",
        "AZURE_STORAGE_CONNECTION_STRING",
    )

    def command(self, env: dict[str, str], run_dir: Path) -> list[str]:
        self.container = sh(*BUILDAH, "from", "--quiet", IMAGE, quiet=True)
        uid = sh(
            *BUILDAH, "run", "--isolation", "chroot", self.container, "--", "id", "-u", quiet=True
        )
        print(f"the daemon runs in the image as uid {uid}, not root")
        jobs = run_dir / "jobs"
        for folder in (jobs, jobs / "inbox"):  # the mounted folders are the daemon's
            os.chown(folder, int(uid), int(uid))
        passed = [a for k in self.PASSED for a in ("--env", f"{k}={env[k]}")]
        mount = ["-v", f"{jobs}:/var/lib/blobferry/jobs"]
        run = ["run", "--isolation", "chroot", *mount, *passed, self.container]
        return [*BUILDAH, *run, "--", "blobferry", "run"]

    def stop(self) -> int:
        """SIGTERM to the daemon itself (buildah would kill it, not pass the signal on);
        the container's exit code."""
        try:
            with open(self.log_path) as log:
                ready = next(json.loads(line) for line in log if '"ready"' in line)
            os.kill(ready["pid"], signal.SIGTERM)  # chroot isolation: the host's PID
            code = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            sh(*BUILDAH, "rm", self.container, quiet=True)
        return code


if __name__ == "__main__":
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install buildah debootstrap")
    if os.geteuid() != 0:
        raise SystemExit("buildah's vfs storage and chroot isolation need root here")
    build()
    sys.exit(main(ImageDaemon))
