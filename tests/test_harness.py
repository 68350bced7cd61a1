"""The harness itself: what tests, the demo and the bench start does not outlive them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.emulators import ROOT

CHILD = """
import sys, time
from pathlib import Path
from tests.emulators import PIDS, emulator
with emulator("moto", Path(sys.argv[1])) as url:
    print(PIDS[url], flush=True)
    time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; its reaper may be slow to collect it


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_an_emulator_dies_with_a_killed_test_run(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "moto.log")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as runner:
        assert runner.stdout is not None
        pid = int(runner.stdout.readline())
        assert alive(pid)
        runner.kill()  # SIGKILL: no finally, no context manager runs
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"moto (pid {pid}) outlived the run that started it"
