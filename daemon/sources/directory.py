"""Jobs as files in a watched folder.

    JOBS_DIR/inbox/NAME.json       dropped by users (atomically, by rename)
    JOBS_DIR/processing/NAME.json  claimed by this daemon
    JOBS_DIR/done/NAME.json        every transfer copied or skipped, NAME.report.json beside it
    JOBS_DIR/failed/NAME.json      anything else, NAME.report.json beside it
    JOBS_DIR/cancel/NAME.json      dropped by users: stop job NAME.json (any content)

A claim is a rename from inbox/ to processing/, atomic on one file system, so two
daemons can never both claim a file. Files whose names start with ``.`` or end in
``.tmp`` or ``.part`` are still being written and are left alone; so is a file
modified in the last ``settle_s`` that does not yet hold complete JSON (a writer that
does not rename). New files are
noticed through watchfiles (inotify); a scan every ``poll_interval_s`` backs it up.
A file in cancel/ is a request, taken (removed) when it is noticed the same way.

The inbox is shared, so anything may land in it: a job file is opened without
following links and without blocking (a FIFO's open() waits for a writer for ever),
and whatever is not a regular file is claimed and filed to failed/ with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import IO

import structlog

from daemon.errors import JobFileError
from daemon.outcome import JobStatus
from daemon.sources.base import ClaimedJob, Ending, first_of

log = structlog.get_logger("blobferry.source")

FOLDERS = ("inbox", "processing", "done", "failed", "cancel")


def is_job_name(name: str) -> bool:
    return not name.startswith(".") and not name.endswith((".tmp", ".part", ".report.json"))


_NAME_MAX = 255  # bytes in a file name, on every Linux file system a jobs folder is on
# A young file up to this size is parsed to see if it is whole; a larger one waits
# settle_s instead, so the claim check never costs a large parse beside the job's own.
_QUICK_CHECK_BYTES = 64 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def open_job_file(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at ``path`` and its stat, or JobFileError
    saying what else is there (a link, a FIFO, a socket, a folder). Never blocks."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if os.path.islink(path):
            raise JobFileError(
                "job file is a symbolic link; blobferry reads only regular files in the inbox"
            ) from None
        raise JobFileError(f"job file cannot be opened: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise JobFileError(f"job file is {kind}; blobferry reads only regular files in the inbox")
    return fd, st


def report_name(job: str) -> str:
    """NAME.report.json for the job file NAME.json. A name too long to take that suffix
    (and the temporary one it is written under) is cut, and a hash of the whole keeps
    it unique; the report itself names the job in full."""
    stem = job.removesuffix(".json")
    name = f"{stem}.report.json"
    if len(f".{name}.tmp".encode()) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
    room = _NAME_MAX - len(f".~{digest}.report.json.tmp")
    cut = stem.encode()[:room].decode(errors="ignore")  # whole characters only
    return f"{cut}~{digest}.report.json"


class DirectorySource:
    def __init__(
        self,
        jobs_dir: Path,
        poll_interval_s: float = 1.0,
        max_bytes: int = 16 << 20,
        settle_s: float = 0.5,
        watch: bool = True,
    ) -> None:
        self.root = jobs_dir
        self.inbox, self.processing, self.done, self.failed, self.cancel = (
            jobs_dir / f for f in FOLDERS
        )
        self._poll = poll_interval_s
        self._max_bytes = max_bytes
        self._settle_s = settle_s
        self._watch_enabled = watch
        self._changed = asyncio.Event()
        self._cancel_changed = asyncio.Event()
        self._refused: dict[str, float] = {}  # job files that could not be claimed: mtime
        self.held_blocks: set[str] = set()  # job files waiting for a namesake in processing/
        self._claimed: set[str] = set()  # in processing/, claimed by this daemon, not filed
        self._stuck_cancels: set[str] = set()  # cancel requests this daemon cannot remove
        self._inbox_count = 0  # job files in inbox/ at the last scan, less those claimed since

    def prepare(self) -> None:
        """Make the folders that are missing. A new inbox/ is one the daemon's group
        may write (2770: setgid, so files dropped there belong to that group too):
        the services that drop jobs run as users of their own, and under the unit's
        UMask=0027 it was 0750, which only the daemon could write. cancel/ is the
        same: whoever may drop a job may cancel one."""
        for shared in (self.inbox, self.cancel):
            if not shared.is_dir():
                shared.mkdir(parents=True, exist_ok=True)
                os.chmod(shared, 0o2770)
        for folder in (self.processing, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)

    def _waiting(self, folder: Path) -> list[tuple[float, str]]:
        """(mtime, name) of the job files in ``folder``, oldest first."""
        found = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if is_job_name(e.name):
                        try:
                            found.append((e.stat(follow_symlinks=False).st_mtime, e.name))
                        except FileNotFoundError:
                            continue
        except FileNotFoundError:
            return []
        return sorted(found)

    def waiting(self) -> int:
        """How many job files wait in inbox/, as of the last scan (poll_interval_s old
        at most): read at every /metrics scrape, so it never lists the folder itself."""
        return self._inbox_count

    async def _scan_inbox(self) -> list[tuple[float, str]]:
        # Off the loop: 100,000 waiting files take a third of a second to list.
        found = await asyncio.to_thread(self._waiting, self.inbox)
        self._inbox_count = len(found)
        return found

    async def jobs(self, stop: asyncio.Event) -> AsyncGenerator[ClaimedJob, None]:
        self.prepare()
        for _, name in self._waiting(self.processing):
            if name in self._claimed or not self._in_processing(name):
                continue  # cancelled before its turn came (and maybe filed already)
            log.info("job recovered", job=name)
            self._claimed.add(name)
            yield ClaimedJob(name, self.processing / name, recovered=True)
        watcher = asyncio.create_task(self._watch(stop), name="inbox-watch")
        # Let it take its first step before the first scan: awatch sets up its inotify
        # watch there, before it first awaits. Scanning first left a window in which a
        # file dropped just after READY waited a whole poll interval.
        await asyncio.sleep(0)
        try:
            while not stop.is_set():
                self._changed.clear()
                claimed = False
                wait = self._poll
                for mtime, name in await self._scan_inbox():
                    if stop.is_set():
                        return
                    # A file written in place (not renamed in) may still be growing.
                    # A young file is taken at once if it already holds complete JSON
                    # (a truncated document never parses); otherwise it is left until
                    # it has been still for settle_s, then taken whatever it holds.
                    young = mtime + self._settle_s - time.time()
                    if young > 0 and not await asyncio.to_thread(self._complete, name):
                        wait = min(wait, young + 0.01)
                        continue
                    if name in self._claimed:
                        # A job of the same name is still in processing/: the rename
                        # would replace its file under it. This one waits its turn.
                        self._hold(name)
                        continue
                    try:
                        os.rename(self.inbox / name, self.processing / name)
                    except FileNotFoundError:
                        continue  # another daemon (or the user) took it first
                    except OSError as e:  # not ours to move: say so once, leave it be
                        self._refuse(name, mtime, e)
                        continue
                    claimed = True
                    self._inbox_count -= 1
                    self.held_blocks.discard(name)
                    self._claimed.add(name)
                    yield ClaimedJob(name, self.processing / name)
                if not claimed:
                    await first_of(stop.wait(), self._changed.wait(), within=wait)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def _hold(self, name: str) -> None:
        if name not in self.held_blocks:
            self.held_blocks.add(name)
            log.info("job waits: one of the same name is still running", job=name)

    def _refuse(self, name: str, mtime: float, e: OSError) -> None:
        """A job file this daemon cannot claim (a sticky inbox and another user's file,
        an inbox it may not write): logged once per version of the file, left in place."""
        if self._refused.get(name) != mtime:
            self._refused[name] = mtime
            log.error(
                "job file cannot be claimed, left in inbox/",
                job=name,
                error=e.strerror,
                fix="the daemon's user must be able to move it: write permission on inbox/ "
                "and processing/, and in a sticky inbox, the file must be that user's",
            )

    async def _watch(self, stop: asyncio.Event) -> None:
        if not self._watch_enabled:
            return
        try:
            from watchfiles import awatch

            async for changes in awatch(self.inbox, self.cancel, stop_event=stop, recursive=False):
                for _, path in changes:
                    folder = Path(path).parent
                    (self._cancel_changed if folder == self.cancel else self._changed).set()
        except Exception as e:  # no inotify here: the poll alone still finds every file
            log.warning("inbox watch unavailable, polling", error=str(e))

    async def cancel_requests(self, stop: asyncio.Event) -> AsyncGenerator[str, None]:
        """The names of jobs asked to stop, a file in cancel/ each: taken (removed) as
        they are noticed; ends when ``stop`` is set."""
        while not stop.is_set():
            self._cancel_changed.clear()
            for _, name in self._waiting(self.cancel):
                try:
                    os.unlink(self.cancel / name)
                except FileNotFoundError:
                    continue
                except OSError as e:  # cannot be taken away: acted on once, and said
                    if name in self._stuck_cancels:
                        continue
                    self._stuck_cancels.add(name)
                    log.error("cancel request cannot be removed", job=name, error=e.strerror)
                yield name
            await first_of(stop.wait(), self._cancel_changed.wait(), within=self._poll)

    def _in_processing(self, name: str) -> bool:
        return os.path.lexists(self.processing / name)

    def claim(self, name: str) -> ClaimedJob | None:
        """Take job ``name`` out of its turn (to file it as cancelled): from inbox/, or
        from processing/ when an earlier run left it there and it has not been yielded
        yet. None when it is neither, or already claimed."""
        if name in self._claimed or not is_job_name(name) or "/" in name:
            return None
        recovered = (self.processing / name).is_file()
        if not recovered:
            try:
                os.rename(self.inbox / name, self.processing / name)
            except OSError:
                return None
        self.held_blocks.discard(name)
        self._claimed.add(name)
        return ClaimedJob(name, self.processing / name, recovered=recovered)

    def _complete(self, name: str) -> bool:
        """Whether a young file can be taken now: it holds complete JSON, or it is no
        job file at all (read() files it with the reason)."""
        try:
            fd, st = open_job_file(self.inbox / name)
        except JobFileError:
            return os.path.lexists(self.inbox / name)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > _QUICK_CHECK_BYTES:
                return False
            data = f.read(_QUICK_CHECK_BYTES + 1)
        try:
            json.loads(data)
        except (ValueError, RecursionError):
            return False
        return True

    async def read(self, job: ClaimedJob) -> bytes:
        path = job.handle
        assert isinstance(path, Path)
        return await asyncio.to_thread(self._read, path)

    def _read(self, path: Path) -> bytes:
        fd, st = open_job_file(path)
        with os.fdopen(fd, "rb") as f:
            # Refused by its size before a byte is read, and by what it holds should it
            # have grown since.
            data = b"" if st.st_size > self._max_bytes else f.read(self._max_bytes + 1)
        if st.st_size > self._max_bytes or len(data) > self._max_bytes:
            raise JobFileError(
                f"job file is larger than {self._max_bytes >> 20} MiB (max_job_file_mb); "
                "split it into several jobs"
            )
        return data

    async def finish(
        self, job: ClaimedJob, ending: Ending, write_report: Callable[[IO[str]], object]
    ) -> None:
        ok = ending.status is JobStatus.DONE
        await asyncio.to_thread(self._finish, job, ok, write_report)
        self._claimed.discard(job.name)  # filed: a namesake in inbox/ may go now

    async def release(self, job: ClaimedJob) -> None:
        """It stays in processing/, and resumes on the next start."""

    def spreader(self, job: ClaimedJob) -> None:
        return None  # one daemon per jobs folder: its prefixes are listed and run here

    def _finish(self, job: ClaimedJob, ok: bool, write_report: Callable[[IO[str]], object]) -> None:
        target = self.done if ok else self.failed
        report = target / report_name(job.name)
        tmp = target / f".{report.name}.tmp"
        target.mkdir(parents=True, exist_ok=True)  # removed while the daemon ran
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                write_report(f)
            os.replace(tmp, report)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        path = job.handle
        assert isinstance(path, Path)
        try:
            os.replace(path, target / job.name)
        except FileNotFoundError:
            # Someone removed it from processing/ while it ran. The report says what
            # happened; a job of the same name may come now.
            log.warning(
                "job file was removed from processing/ while the job ran; its report is filed",
                report=str(report),
            )
