"""`blobferry status`: the jobs, one job's transfers, or (``--watch``) the screen
`blobferry copy` shows, read from the state database. Read-only: it may run as any
user of the daemon's group, beside a running daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from daemon.outcome import JobStatus, Status
from daemon.progress import RecentRate, View, from_rows
from daemon.records import TransferRow, iso
from daemon.screen import Screen, counts, headline
from daemon.settings import Settings
from daemon.state import StateStore

EXIT_OK, EXIT_FAILED = 0, 1  # as cli.py's


def status(args: argparse.Namespace, settings: Settings) -> int:
    db = settings.state_dir / "blobferry.sqlite3"
    if not db.exists():
        print("no jobs yet", file=sys.stderr)
        return EXIT_OK
    state = StateStore(db, read_only=True)
    try:
        if args.watch:
            return _watch(state, args.job)
        if args.job:
            row = state.job(args.job) or state.job(args.job + ".json")
            if row is None:
                print(f"blobferry: no job named {args.job}", file=sys.stderr)
                return EXIT_FAILED
            if args.json:
                state.write_report(row.job, sys.stdout)
                return EXIT_OK
            print(f"{row.job}  {row.status}  started {iso(row.started_at)}")
            for t in state.transfers(row.job):
                line = f"  {progress(t)}  {t.source} -> {t.destination}"
                print(line + (f"\n              {t.error}" if t.error else ""))
            return EXIT_OK
        rows = state.jobs()
        if args.json:
            print(json.dumps([_row(r) for r in rows]))
            return EXIT_OK
        for r in rows:
            dry = ""
            if r.would_copy:  # a dry run
                dry = f" ({r.would_copy} would be copied, {r.would_copy_bytes} B)"
            print(
                f"{r.job:<40} {r.status:<11} {r.copied} copied, {r.skipped} skipped{dry}, "
                f"{r.failed} failed, {r.bytes_done} B  (started {iso(r.started_at)})"
            )
        return EXIT_OK
    finally:
        state.close()


def _watch(state: StateStore, job: str | None) -> int:
    """The screen `blobferry copy` shows, for one job of the daemon's or all its running
    ones, read again from the state database every second until interrupted."""
    if job is not None and state.job(job) is None and state.job(job + ".json") is not None:
        job += ".json"
    rate = RecentRate()
    screen = Screen(True)

    def read() -> View:
        if job is not None:
            rows = list(state.transfers(job))
        else:
            running = [j.job for j in state.jobs() if j.status == JobStatus.RUNNING]
            rows = [t for name in running for t in state.transfers(name)]
        return from_rows(rows, rate)

    view = read()
    screen.start(view)
    try:
        while True:
            if screen.enabled:
                screen.show(view)
            else:  # not a terminal: a plain line a second
                print(f"{headline(view)}   {counts(view)}", flush=True)
            time.sleep(1)
            view = read()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        screen.stop(view)


def progress(t: TransferRow) -> str:
    """A transfer's figures in `blobferry status`; one running also says how far it is
    and, at its rate so far, how long it has to go: a file of days is watched by this."""
    total = t.bytes_total if t.status == Status.RUNNING else None
    line = f"{t.status:<11} {t.bytes_done}"
    line += f"/{total} B {100 * t.bytes_done / total:5.1f}%" if total else " B"
    line += f"  {t.rate / 2**20:7.1f} MiB/s"
    if (left := t.seconds_left) is not None:
        line += f"  ~{duration(left)} left"
    return line


def duration(seconds: float) -> str:
    """3d04h, 2h05m, 4m10s or 12s: two units at most, as a person reads an estimate."""
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02}h"
    if hours:
        return f"{hours}h{minutes:02}m"
    return f"{minutes}m{s:02}s" if minutes else f"{s}s"


def _row(r: object) -> dict[str, object]:
    return {k: getattr(r, k) for k in r.__slots__}  # type: ignore[attr-defined]
