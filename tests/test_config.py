"""Tests for merging the config file with command-line options."""

from __future__ import annotations

from pathlib import Path

import pytest

from netrpc.config import Limits, merge_settings, read_config_file
from netrpc.exceptions import ConfigurationError


def test_defaults() -> None:
    settings = merge_settings({}, {})
    assert settings.limits == Limits()
    assert settings.listen == ()
    assert settings.pki is None


def test_file_values(tmp_path: Path) -> None:
    path = tmp_path / "securerpc.toml"
    path.write_text(
        'listen = ["mtls:port=9000"]\n'
        'methods = "netrpc.demo"\n'
        'pki = "/etc/securerpc/pki"\n'
        "max_message_size = 2048\n"
        "call_timeout = 2.5\n"
    )
    settings = merge_settings(read_config_file(path), {})
    assert settings.listen == ("mtls:port=9000",)
    assert settings.methods == ("netrpc.demo",)
    assert settings.pki == Path("/etc/securerpc/pki")
    assert settings.limits.max_message_size == 2048
    assert settings.limits.call_timeout == 2.5


def test_command_line_wins() -> None:
    settings = merge_settings(
        {"max_batch_length": 10, "user": "alice"},
        {"max_batch_length": "20", "user": None},
    )
    assert settings.limits.max_batch_length == 20
    assert settings.user == "alice"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_mesage_size": 1}, "unknown key 'max_mesage_size'"),
        ({"max_message_size": "big"}, "max_message_size .* must be a whole number, not 'big'"),
        ({"max_message_size": 0}, "must be positive"),
        ({"call_timeout": True}, "must be a number"),
        ({"listen": [1]}, "listen .* must be a list of strings"),
        ({"user": ""}, "user .* must be a non-empty string"),
        ({"policy": "alice"}, r"\[policy\] .* must be a table"),
    ],
)
def test_invalid_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        merge_settings(values, {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found; pass an existing file"):
        read_config_file(tmp_path / "absent.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("listen = [\n")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        read_config_file(path)
