"""One Settings object, built at the edge (the CLI) and passed in.

Sources, highest first: keyword arguments, ``BLOBFERRY_*`` environment variables
(nested with ``__``, e.g. ``BLOBFERRY_S3__ENDPOINT_URL``), the TOML file named by
``--config`` or ``BLOBFERRY_CONFIG``, then the defaults below. ``AZURE_STORAGE_CONNECTION_STRING``
is honoured when no connection string is set otherwise.

The tables of the services it talks to ([s3], [azure], [sqs], [retry]) are in
service_settings.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.bandwidth import Timetable, timetable
from daemon.errors import ConfigError
from daemon.routing import RouteIn
from daemon.service_settings import AzureSettings, RetrySettings, S3Settings, SqsSettings

MiB = 1024 * 1024


def host_port(address: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT) as (host, port); raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, such as 127.0.0.1:9464")
    return host.strip("[]"), int(port)


def home() -> Path:
    """The folder that holds jobs/ and state/ unless the settings say otherwise:
    $STATE_DIRECTORY (systemd's, from StateDirectory=), else $XDG_STATE_HOME/blobferry,
    else ~/.local/state/blobferry."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "blobferry"


class Settings(BaseSettings):
    """Everything blobferry can be told. See config/blobferry.example.toml."""

    model_config = SettingsConfigDict(
        env_prefix="BLOBFERRY_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    # Where people expect a program's state: systemd's StateDirectory= for the service
    # (/var/lib/blobferry), the XDG state directory for a user's runs; never the folder
    # a `blobferry copy` happens to be run in.
    jobs_dir: Path = Field(default_factory=lambda: home() / "jobs")
    state_dir: Path = Field(default_factory=lambda: home() / "state")
    max_transfers: int = Field(
        default=32,
        ge=1,
        description="Objects in flight at once. Small objects are latency-bound, so many "
        "in flight is what makes them fast; memory is bounded by memory_mb regardless. "
        "Changes on reload (SIGHUP): lower, it lets the transfers in flight finish.",
    )
    memory_mb: int = Field(
        default=96,
        ge=1,
        description="One budget for the bytes of all blocks in flight. The process adds "
        "about 100 MiB of its own, so 96 keeps the whole daemon near 200-250 MiB. "
        "Changes on reload (SIGHUP): lower, it lets the blocks in flight land.",
    )
    block_size_mb: int = Field(
        default=4,
        ge=1,
        le=4000,
        description="Smallest block; grows to stay under 50,000. Small blocks keep many "
        "streams in flight within memory_mb, which is what a slow, distant link needs.",
    )
    block_concurrency: int = Field(
        default=64,
        ge=1,
        description="Most blocks of one object in flight at once. The memory budget, "
        "shared in turn by every transfer, is the usual bound: an object alone takes all "
        "of it (memory_mb / block size, 24 blocks by default), several take turns. The "
        "default is the connection pools' size, so it binds only with a larger memory_mb. "
        "Server-side mode holds no memory, so there it is the bound.",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, le=2.0)
    watch: bool = Field(
        default=True,
        description="Notice new job files through inotify (watchfiles); false polls the "
        "inbox every poll_interval_s only (for jobs folders on NFS, where inotify is blind).",
    )
    progress_interval_s: float = Field(default=5.0, gt=0)
    grace_period_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long blocks in flight may take to land. Keep it "
        "under the unit's TimeoutStopSec.",
    )
    max_job_file_mb: int = Field(
        default=16, ge=1, description="Larger job files fail; 100,000 transfers take ~12 MiB."
    )
    keep_days: float = Field(
        default=30,
        ge=0,
        description="Finished jobs are dropped from the state database after this many "
        "days (their reports in done/ and failed/ stay); 0 keeps them for ever.",
    )
    bandwidth_mb_s: float | str = Field(
        default=0,
        description="A cap on the MB/s (10^6 bytes) read from S3 and sent on, all "
        "transfers together, so the service sharing the instance keeps its network: a "
        "number (0: none), or a timetable by local time of day such as "
        "'08:00,20 19:00,off', or of the week such as 'Mon-08:00,20 Fri-19:00,off'. "
        "Changes on reload (SIGHUP). Server-side mode moves no payload here and is not capped.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_address: str | None = Field(
        default=None,
        description="HOST:PORT to serve Prometheus metrics on, at /metrics (such as "
        "127.0.0.1:9464); off by default.",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto", description="auto: uvloop when it is installed (it is a dependency)."
    )
    mode: Literal["stream", "server-side"] = Field(
        default="stream",
        description="server-side: Azure fetches each block from a freshly presigned S3 "
        "range (Put Block From URL); falls back to stream when Azure cannot reach S3.",
    )
    pipe_max_mb: int = Field(
        default=1024,
        ge=0,
        le=5000,
        description="On a near link, an object up to this size goes as one GET piped into "
        "one Put Blob carrying S3's MD5 ETag (single-part) or else its full-object "
        "CRC64NVME, which Azure checks: nothing is hashed here and one stream runs at "
        "the link's speed. Not resumable: a kill re-reads the object. 0 turns it off "
        "(5000 MiB is Put Blob's limit).",
    )
    pipe_rtt_ms: float = Field(
        default=10.0,
        ge=0,
        description="A link is near when the fastest recent small request (a HEAD) to S3 "
        "and to Azure both answer within this; far when three have, none within it. "
        "Farther away one stream is slow, and blocks go in parallel.",
    )
    verify: bool = Field(
        default=True,
        description="Compute each object's MD5 (and part MD5s) while streaming and prove "
        "the copy against S3's ETag. Per-block checks (azure.block_check) are always sent.",
    )
    content_md5: bool = Field(
        default=True,
        description="Store each blob's MD5 as its Content-MD5, for downloaders to check. "
        "Where S3's ETag is the object's MD5 this costs nothing. A multipart object's "
        "costs one MD5 pass (about 1.4 CPU s/GiB), which false saves where the copy is "
        "proven without it: by S3's CRC64NVME, or by the part MD5s of parts that are "
        "single blocks.",
    )
    archived: Literal["skip", "fail"] = Field(
        default="skip",
        description="Objects in Glacier or Deep Archive that are not restored: reported "
        "as skipped (the job still succeeds) or failed.",
    )
    s3: S3Settings = S3Settings()
    azure: AzureSettings = AzureSettings()
    retry: RetrySettings = RetrySettings()
    sqs: SqsSettings = SqsSettings()
    routes: list[RouteIn] = Field(
        default_factory=list,
        description="[[routes]]: which destination an S3 event's key goes to. Each has "
        "source (s3://bucket/prefix/), destination (az://container/prefix/), any job "
        "option (overwrite, tier, metadata, include, exclude ...) and delete.",
    )

    @field_validator("bandwidth_mb_s")
    @classmethod
    def _bandwidth(cls, v: float | str) -> float | str:
        timetable(v)  # raises ValueError naming what is wrong
        return v

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            host_port(v)
        return v

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        # systemd starts services in /, so a relative path would land in the root
        # file system: pin every path to an absolute one at load time.
        self.jobs_dir = self.jobs_dir.expanduser().resolve()
        self.state_dir = self.state_dir.expanduser().resolve()
        return self

    @property
    def block_size(self) -> int:
        return self.block_size_mb * MiB

    @property
    def pipe_max(self) -> int:
        return self.pipe_max_mb * MiB

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * MiB

    @property
    def bandwidth(self) -> Timetable:
        """bandwidth_mb_s as the timetable it stands for (validated at load)."""
        return timetable(self.bandwidth_mb_s)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    return f"configuration error: {where}: {msg}"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the Settings, or raise ConfigError with one line naming the bad setting."""
    path = config or (Path(p) if (p := os.environ.get("BLOBFERRY_CONFIG")) else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration error: config file {path} does not exist")
    if path is None:
        cls: type[Settings] = Settings
    else:

        class _FromFile(Settings):
            model_config = SettingsConfigDict(toml_file=path)

        cls = _FromFile
    try:
        settings = cls(**overrides)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    except (OSError, ValueError) as e:  # unreadable or malformed TOML
        raise ConfigError(f"configuration error: {path}: {e}") from None
    if settings.azure.connection_string is None and settings.azure.account_url is None:
        env_cs = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if env_cs:  # the credential only: every other [azure] setting stays
            given = {**settings.azure.model_dump(), "connection_string": SecretStr(env_cs)}
            try:
                settings.azure = AzureSettings(**given)
            except ValidationError as e:
                raise ConfigError(_describe(e)) from None
    return settings


def require_azure(settings: Settings) -> None:
    if not settings.azure.configured:
        raise ConfigError(
            "configuration error: azure: no destination account; set "
            "BLOBFERRY_AZURE__CONNECTION_STRING (or AZURE_STORAGE_CONNECTION_STRING) "
            "or BLOBFERRY_AZURE__ACCOUNT_URL"
        )
