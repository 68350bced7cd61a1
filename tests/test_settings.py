from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import load_settings


def test_environment_nested_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "blobferry.toml"
    toml.write_text('max_transfers = 7\nblock_size_mb = 16\n[s3]\nregion = "eu-west-1"\n')
    monkeypatch.setenv("BLOBFERRY_CONFIG", str(toml))
    monkeypatch.setenv("BLOBFERRY_MEMORY_MB", "64")
    monkeypatch.setenv("BLOBFERRY_S3__ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("BLOBFERRY_BLOCK_SIZE_MB", "32")  # the environment beats the file
    s = load_settings()
    assert (s.max_transfers, s.memory_mb, s.block_size_mb) == (7, 64, 32)
    assert s.s3.region == "eu-west-1" and s.s3.endpoint_url == "http://127.0.0.1:9"
    assert s.jobs_dir.is_absolute() and s.state_dir.is_absolute()


def test_connection_string_from_azure_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=sekrit")
    monkeypatch.setenv("BLOBFERRY_AZURE__BLOCK_CHECK", "md5")
    monkeypatch.setenv("BLOBFERRY_AZURE__CREATE_CONTAINERS", "true")
    s = load_settings()
    assert s.azure.connection_string is not None
    assert "sekrit" not in repr(s) and "sekrit" not in str(s.model_dump())
    # The variable gives the credential; the other [azure] settings stay as given.
    assert s.azure.block_check == "md5" and s.azure.create_containers


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BLOBFERRY_MAX_TRANSFERS": "zero"}, "max_transfers"),
        ({"BLOBFERRY_MAX_TRANSFERS": "0"}, "max_transfers"),
        (
            {
                "BLOBFERRY_AZURE__CONNECTION_STRING": "x",
                "BLOBFERRY_AZURE__ACCOUNT_URL": "https://a",
            },
            "azure.connection_string contradicts azure.account_url",
        ),
        ({"BLOBFERRY_AZURE__ACCOUNT_KEY": "k"}, "need azure.account_url"),
        (
            {
                "BLOBFERRY_AZURE__ACCOUNT_URL": "https://a",
                "BLOBFERRY_AZURE__ACCOUNT_KEY": "k",
                "BLOBFERRY_AZURE__SAS_TOKEN": "s",
            },
            "account_key contradicts azure.sas_token",
        ),
        ({"BLOBFERRY_S3__PRESIGN_EXPIRES_S": "700000"}, "s3.presign_expires_s"),
        ({"BLOBFERRY_AZURE__ACCOUNT_URL": "http://a"}, "must be https:// for an Azure AD"),
    ],
)
def test_bad_settings_are_one_clear_line(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert named in message and "\n" not in message
    assert "sekrit" not in message


def test_unknown_setting_in_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_transfer = 3\n")
    with pytest.raises(ConfigError, match="max_transfer: unknown setting"):
        load_settings(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_the_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    s = load_settings(root / "config" / "blobferry.example.toml")
    assert s.jobs_dir == Path("/var/lib/blobferry/jobs") and s.azure.account_url
    unit = (root / "config" / "blobferry.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    # The drain must finish before systemd's SIGKILL.
    stop = int(next(x for x in unit.splitlines() if x.startswith("TimeoutStopSec=")).split("=")[1])
    assert s.grace_period_s < stop


def test_folders_default_to_systemds_state_directory_else_xdgs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from daemon.settings import load_settings

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    s = load_settings(None)
    assert s.state_dir == tmp_path / "home" / ".local" / "state" / "blobferry" / "state"
    assert s.jobs_dir == tmp_path / "home" / ".local" / "state" / "blobferry" / "jobs"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert load_settings(None).state_dir == tmp_path / "xdg" / "blobferry" / "state"
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/var/lib/blobferry:/elsewhere")
    s = load_settings(None)
    assert s.jobs_dir == tmp_path / "var" / "lib" / "blobferry" / "jobs"
    monkeypatch.setenv("BLOBFERRY_STATE_DIR", str(tmp_path / "mine"))
    assert load_settings(None).state_dir == tmp_path / "mine"
