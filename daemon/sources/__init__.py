"""Where jobs come from. Everything below the supervisor sees only ``JobSource``."""

from __future__ import annotations

from daemon.sources.base import ClaimedJob, JobSource
from daemon.sources.directory import DirectorySource

__all__ = ["ClaimedJob", "DirectorySource", "JobSource"]
