"""The tables of the services blobferry talks to: ``[s3]``, ``[azure]``, ``[sqs]``, and
``[retry]`` for every request to them. Settings (settings.py) holds one of each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator


class S3Settings(BaseModel):
    """The S3 side. Credentials come from the standard AWS chain (environment,
    shared profile, EC2 instance role); they are never settings here."""

    model_config = {"extra": "forbid"}

    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; None means AWS itself."
    )
    region: str = "us-east-1"
    profile: str | None = Field(default=None, description="AWS shared-config profile.")
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    presign_expires_s: int = Field(
        default=900,
        ge=1,
        le=604800,
        description="Lifetime of each presigned range URL. URLs are signed just before use, "
        "so this only needs to cover one request.",
    )
    max_connections: int = Field(default=64, ge=1)
    local_signing: bool = Field(
        default=True,
        description="Sign each range GET here (s3_signing.py), in microseconds; false: "
        "botocore presigns every one (about a millisecond of CPU each).",
    )
    direct_reads: bool = Field(
        default=True,
        description="Read each GET's body straight into its block's buffer (http1.py); "
        "false: through aiohttp, which copies each byte twice on the way (about 0.5 CPU "
        "s/GiB). Through an egress proxy or under a bandwidth cap aiohttp reads anyway.",
    )


class AzureSettings(BaseModel):
    """The Azure side: a connection string, or an account URL with a key, a SAS token
    or nothing (then azure-identity's DefaultAzureCredential)."""

    model_config = {"extra": "forbid"}

    connection_string: SecretStr | None = None
    account_url: str | None = None
    account_key: SecretStr | None = None
    sas_token: SecretStr | None = None
    max_connections: int = Field(default=64, ge=1)
    tiers: dict[str, Literal["Hot", "Cool", "Cold", "Archive"]] = Field(
        default_factory=dict,
        description='S3 storage class -> access tier, e.g. {STANDARD_IA = "Cool"}; '
        "a job's own tier wins; unmapped classes get the account's default tier.",
    )
    direct: bool = Field(
        default=True,
        description="Put Blob, Put Block and Get Blob Properties go straight to aiohttp "
        "(azure_direct.py), not through the SDK's pipeline (about 2 ms of CPU a request); "
        "false: through the SDK, and objects are never piped (the SDK would hold the "
        "body whole).",
    )
    direct_writes: bool = Field(
        default=True,
        description="On the direct path, send each Put Blob and Put Block body straight "
        "from its buffer (http1.py); false: by aiohttp, about 0.3 ms more CPU a request. "
        "Through an egress proxy, and for a piped body, aiohttp sends anyway.",
    )
    block_check: Literal["crc64", "md5"] = Field(
        default="crc64",
        description="What Azure checks each staged block against where the block's MD5 "
        "is not itself the proof: its CRC64 (about a twelfth of an MD5's CPU here; Azure "
        "computes it for every block anyway), or its MD5, for an endpoint that does not "
        "check x-ms-content-crc64. A multipart object cut one block per part always "
        "sends the block MD5s, which prove its composite ETag.",
    )
    create_containers: bool = Field(
        default=False,
        description="Create a destination container that does not exist, as AzCopy and "
        "rclone do. Off, such a transfer fails saying so: a misspelt container name in a "
        "job would otherwise quietly become a new container.",
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> AzureSettings:
        if self.connection_string is not None:
            extra = [
                n
                for n in ("account_url", "account_key", "sas_token")
                if getattr(self, n) is not None
            ]
            if extra:
                raise ValueError(
                    f"azure.connection_string contradicts azure.{extra[0]}: set one or the other"
                )
        elif self.account_url is None and (
            self.account_key is not None or self.sas_token is not None
        ):
            raise ValueError("azure.account_key / azure.sas_token need azure.account_url")
        if self.account_key is not None and self.sas_token is not None:
            raise ValueError("azure.account_key contradicts azure.sas_token: set one or the other")
        if (
            self.account_url is not None
            and self.account_key is None
            and self.sas_token is None
            and not self.account_url.lower().startswith("https://")
        ):
            raise ValueError(
                "azure.account_url must be https:// for an Azure AD identity (no account key "
                "or SAS token is set, and a bearer token is never sent in the clear)"
            )
        return self

    @property
    def configured(self) -> bool:
        return self.connection_string is not None or self.account_url is not None


class RetrySettings(BaseModel):
    model_config = {"extra": "forbid"}

    attempts: int = Field(default=8, ge=1, description="Tries per request, the first included.")
    backoff_s: float = Field(default=0.5, gt=0, description="First wait; doubles each try.")
    backoff_max_s: float = Field(default=30.0, gt=0)
    stall_timeout_s: float = Field(
        default=30.0, gt=0, description="A connection that delivers no byte this long is dropped."
    )
    connect_timeout_s: float = Field(default=15.0, gt=0)


class SqsSettings(BaseModel):
    """A queue the daemon takes jobs from, beside its folder; several daemons on one
    queue share its work. Credentials: the same chain as S3's."""

    model_config = {"extra": "forbid"}

    queue_url: str | None = Field(default=None, description="Off when not set.")
    region: str | None = Field(default=None, description="Default: s3.region.")
    endpoint_url: str | None = None
    results: str | None = Field(
        default=None,
        description="Where queue jobs' reports go, named by job: az://container/prefix/, "
        "s3://bucket/prefix/ or a folder. The fleet's reports belong in one shared place; "
        "default: JOBS_DIR/results/, this instance's only.",
    )
    wait_s: int = Field(default=20, ge=0, le=20, description="Long polling: SQS's most.")
    visibility_s: int = Field(
        default=120,
        ge=10,
        le=43200,
        description="How long a message stays hidden from the fleet; renewed every third "
        "of it while its job runs, so a daemon killed mid-job frees it within this.",
    )
    retry_delay_s: int = Field(
        default=60,
        ge=0,
        le=43200,
        description="A job that failed for a passing reason comes back after this, "
        "doubled at each receive (at most 15 minutes), until the queue's maxReceiveCount.",
    )
    page_keys: int = Field(
        default=1000,
        ge=1,
        le=10000,
        description="A prefix job taken from the queue is listed and put back as jobs of "
        "at most this many keys, so the whole fleet copies it.",
    )
    page_mb: int = Field(
        default=1024,
        ge=1,
        description="... and of at most this many MiB of objects (a larger object goes "
        "alone), so large objects listed together are spread over the fleet too.",
    )

    @field_validator("results")
    @classmethod
    def _results(cls, v: str | None) -> str | None:
        if v is not None and v.startswith(("az://", "s3://")) and not v.endswith("/"):
            raise ValueError(f"{v!r}: results is a prefix, and ends with /")
        return v
