"""The command line: run, copy, submit, cancel, status.

Exit codes: 0 all copied (or skipped), 1 a transfer failed, 2 a usage or configuration
error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon import __version__, app
from daemon.errors import BlobferryError, ConfigError, JobFileError
from daemon.jobs import TIERS, parse_job
from daemon.logs import configure
from daemon.outcome import JobStatus
from daemon.progress import JobProgress
from daemon.reload import Reloader
from daemon.screen import Screen
from daemon.settings import Settings, load_settings
from daemon.sources.directory import report_name
from daemon.state import StateStore
from daemon.status import status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"blobferry: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="blobferry", description="Stream objects from Amazon S3 to Azure Blob Storage."
    )
    p.add_argument("--version", action="version", version=f"blobferry {__version__}")
    p.add_argument("--config", type=Path, help="TOML settings file (or BLOBFERRY_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon in the foreground (for systemd)")
    c = sub.add_parser("copy", help="copy now, in this process, and exit")
    c.add_argument("source", help="s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    c.add_argument("destination", help="az://CONTAINER/BLOB, az://CONTAINER/PREFIX/ or https://...")
    _option_flags(c)
    c.add_argument("--quiet", action="store_true", help="no progress display")
    s = sub.add_parser("submit", help="validate a job and drop it into the inbox")
    s.add_argument("args", nargs="+", metavar="FILE.json | SOURCE DESTINATION")
    _option_flags(s)
    s.add_argument("--name", help="job name (default: derived)")
    ca = sub.add_parser("cancel", help="stop a running job, or take back a waiting one")
    ca.add_argument("job", help="the job's file name (NAME.json, or NAME)")
    ca.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to file the job (0: do not wait)",
    )
    st = sub.add_parser("status", help="jobs and their transfers")
    st.add_argument("job", nargs="?")
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--watch", action="store_true", help="the copy's screen, refreshed, until Ctrl-C"
    )
    return p


def _option_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        choices=["if-changed", "always", "never"],
        default="if-changed",
        help="if-changed (default): skip a blob that already holds this version of the object",
    )
    p.add_argument("--content-type", help="replace the source's Content-Type")
    p.add_argument("--tier", choices=list(TIERS), help="access tier of the new blobs")
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="metadata to set on the blobs (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="copy nothing: report each object as skipped, unchanged or would be copied",
    )
    for flag, which in (("--include", "only keys"), ("--exclude", "no keys")):
        p.add_argument(
            flag,
            action="append",
            metavar="GLOB",
            help=f"under a prefix, copy {which} matching GLOB (repeatable; '*.csv', 'logs/**')",
        )


def _options_doc(args: argparse.Namespace) -> dict[str, object]:
    """The job-file fields the flags stand for (validated by parse_job)."""
    doc: dict[str, object] = {"overwrite": args.overwrite}
    if args.content_type is not None:
        doc["content_type"] = args.content_type
    if args.tier is not None:
        doc["tier"] = args.tier
    if args.metadata:
        pairs = [m.partition("=") for m in args.metadata]
        if any(not sep for _, sep, _ in pairs):
            raise JobFileError("--metadata takes NAME=VALUE")
        doc["metadata"] = {k: v for k, _, v in pairs}
    for field in ("include", "exclude", "dry_run"):
        if getattr(args, field):
            doc[field] = getattr(args, field)
    return doc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"blobferry: {e}", file=sys.stderr)
        return EXIT_USAGE
    command: Callable[[argparse.Namespace, Settings], int] = {
        "run": _run,
        "copy": _copy,
        "submit": _submit,
        "cancel": _cancel,
        "status": status,
    }[args.command]
    try:
        return command(args, settings)
    except (ConfigError, JobFileError) as e:
        print(f"blobferry: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BlobferryError as e:
        print(f"blobferry: {e}", file=sys.stderr)
        return EXIT_FAILED


def _signals(stop: asyncio.Event, force: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: drain. Second: stop at once. Handlers only set events."""
    loop = asyncio.get_running_loop()

    def handler(signame: str) -> None:
        if stop.is_set():
            structlog.get_logger("blobferry").warning("second signal, stopping now", signal=signame)
            force.set()
        else:
            structlog.get_logger("blobferry").info("stopping", signal=signame)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig.name)


def _arun(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop unless told otherwise: its socket I/O costs far less CPU."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop != "asyncio":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise ConfigError(
                    "configuration error: event_loop: uvloop is not installed"
                ) from None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure(settings.log_level)

    async def main() -> None:
        stop, force = asyncio.Event(), asyncio.Event()
        _signals(stop, force)
        reloader = Reloader(partial(load_settings, args.config))
        # systemctl reload (ExecReload= in the unit). Unhandled, SIGHUP killed the daemon.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.ask)
        await app.serve(settings, stop, force, reloader=reloader)

    _arun(settings, main())
    return EXIT_OK


async def _draw(screen: Screen, watcher: JobProgress) -> None:
    while True:
        screen.show(watcher.view())
        await asyncio.sleep(0.25)


def _copy(args: argparse.Namespace, settings: Settings) -> int:
    [spec] = parse_job(
        json.dumps({"source": args.source, "destination": args.destination, **_options_doc(args)})
    )
    # stdout carries the report; people read the log lines on stderr.
    level = "warning" if settings.log_level == "info" else settings.log_level
    configure(level, json=False, stream=sys.stderr)
    name = f"copy-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}"
    watcher = JobProgress()
    screen = Screen(not args.quiet)  # and only on a terminal

    async def main() -> tuple[str, StateStore]:
        stop, force = asyncio.Event(), asyncio.Event()
        _signals(stop, force)
        screen.start(watcher.view())
        drawing = asyncio.create_task(_draw(screen, watcher)) if screen.enabled else None
        try:
            return await app.copy_once(settings, name, [spec], stop, watcher)
        finally:
            if drawing is not None:
                drawing.cancel()
                await asyncio.gather(drawing, return_exceptions=True)

    try:
        status, state = _arun(settings, main())
    finally:
        screen.stop(watcher.view())
    state.write_report(name, sys.stdout)
    state.close()
    exits = {JobStatus.DONE: EXIT_OK, JobStatus.FAILED: EXIT_FAILED}
    return exits.get(JobStatus(status), EXIT_INTERRUPTED)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    if len(args.args) == 1:
        path = Path(args.args[0])
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise JobFileError(f"{path}: {e.strerror}") from None
        parse_job(raw)  # validate before it reaches the daemon
        name = args.name or path.name
    elif len(args.args) == 2:
        doc = {"source": args.args[0], "destination": args.args[1], **_options_doc(args)}
        raw = json.dumps(doc, indent=2).encode()
        parse_job(raw)
        name = args.name or f"submit-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    else:
        raise JobFileError("submit takes FILE.json, or SOURCE DESTINATION")
    if not name.endswith(".json"):
        name += ".json"
    _plain_name(name)
    inbox = settings.jobs_dir / "inbox"
    try:
        _drop(inbox, name, raw)
    except FileExistsError:
        raise JobFileError(f"a job named {name} is already waiting in {inbox}") from None
    except OSError as e:
        raise JobFileError(f"cannot put a job into {inbox}: {_group_hint(e)}") from None
    print(name)
    return EXIT_OK


def _plain_name(name: str) -> None:
    if "/" in name or name.startswith(".") or "\0" in name or not name:
        raise JobFileError(f"job name {name!r} must be a plain file name")
    if len(name.encode()) > 255:
        raise JobFileError("job name is longer than a file name may be (255 bytes)")


def _group_hint(e: OSError) -> str:
    return (
        f"{e.strerror}; the daemon's group may write there (see 'Running under systemd' "
        "in the README)"
    )


def _drop(folder: Path, name: str, raw: bytes) -> Path:
    """Put ``raw`` into ``folder/name`` whole (written aside, then linked in); raises
    FileExistsError rather than replace a file of that name."""
    target = folder / name
    tmp = folder / f".submit-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    folder.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        # Readable by the daemon, which runs as a user of its own, whatever this
        # user's umask: a job file holds addresses and options, no secret.
        os.fchmod(f.fileno(), 0o644)
        f.write(raw)
    try:
        os.link(tmp, target)  # unlike rename, refuses to replace a file of that name
    finally:
        tmp.unlink()
    return target


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Ask the daemon to stop a job (a file in cancel/), then wait for its report."""
    jobs = settings.jobs_dir
    names = [args.job] if args.job.endswith(".json") else [args.job, args.job + ".json"]
    for name in names:
        _plain_name(name)
    found = [n for n in names if _waits_or_runs(jobs, n)]
    if not found:
        print(f"blobferry: no job named {args.job} waits or runs in {jobs}", file=sys.stderr)
        return EXIT_FAILED
    name = found[0]
    try:
        request = _drop(jobs / "cancel", name, b"")
        asked = request.stat().st_mtime_ns
    except FileExistsError:
        print(f"{name}: already asked to cancel", file=sys.stderr)
        return EXIT_OK
    except OSError as e:
        raise JobFileError(f"cannot ask to cancel in {jobs / 'cancel'}: {_group_hint(e)}") from None
    if args.wait <= 0:
        print(f"{name}: cancel requested")
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        report = _newest_report(jobs, name)
        gone = not request.exists() and not _waits_or_runs(jobs, name)
        if report is not None and (report[2] >= asked or gone):
            path, status, _ = report
            if status == JobStatus.CANCELLED:
                print(f"{name}: cancelled; report {path}")
                return EXIT_OK
            print(f"{name}: had already finished ({status}); report {path}")
            return EXIT_FAILED
        time.sleep(0.1)
    if request.exists():
        print(
            f"blobferry: the daemon has not taken the request within {args.wait:g} s (is it "
            "running?); it stays in cancel/ and is acted on when the daemon starts",
            file=sys.stderr,
        )
    else:
        print(f"blobferry: the daemon took the request; {name} is still stopping", file=sys.stderr)
    return EXIT_FAILED


def _waits_or_runs(jobs: Path, name: str) -> bool:
    """Whether a job file ``name`` is in inbox/ or processing/."""
    return any((jobs / folder / name).exists() for folder in ("processing", "inbox"))


def _newest_report(jobs: Path, name: str) -> tuple[Path, str, int] | None:
    """The job's newest report in done/ or failed/: its path, status and mtime (ns)."""
    found = []
    for folder in ("failed", "done"):
        path = jobs / folder / report_name(name)
        try:
            mtime = path.stat().st_mtime_ns
            status = json.loads(path.read_bytes())["status"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # none, or being replaced
        found.append((path, str(status), mtime))
    return max(found, key=lambda r: r[2], default=None)
