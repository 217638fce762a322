"""Tests for merging the config file with command-line options."""

from __future__ import annotations

from pathlib import Path

import pytest

from netrpc.audit import AuditSettings
from netrpc.config import Limits, merge_settings, read_config_file
from netrpc.daemon import Options, load_settings
from netrpc.exceptions import ConfigurationError
from netrpc.policy import Policy, Rule


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
        ({"max_message_size": "big"}, "max_message_size .* must be a whole number above 0, not 'big'"),
        ({"max_message_size": 0}, "must be a whole number above 0"),
        ({"max_message_size": float("inf")}, "must be a whole number above 0, not inf"),
        ({"max_in_flight": 2.5}, "must be a whole number above 0, not 2.5"),
        ({"call_timeout": True}, "must be a number above 0"),
        ({"call_timeout": "nan"}, "must be a number above 0, not 'nan'"),
        ({"idle_timeout": float("nan")}, "must be a number above 0"),
        ({"handshake_timeout": "inf"}, "must be a number above 0"),
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


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("instance = 'café'\n".encode("latin-1"))
    with pytest.raises(ConfigurationError, match="is not UTF-8 text"):
        read_config_file(path)


def test_whole_number_from_float() -> None:
    """A whole number written as 4.0 in TOML is accepted as 4."""
    settings = merge_settings({"max_in_flight": 4.0}, {})
    assert settings.limits.max_in_flight == 4
    assert type(settings.limits.max_in_flight) is int


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("listen = [\n")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        read_config_file(path)


def test_policy_and_audit_tables() -> None:
    settings = merge_settings(
        {
            "policy": {"rule": [{"identities": ["alice"], "methods": ["compute.*"]}]},
            "audit": {"format": "json"},
        },
        {"audit": {"include_params": True}},
    )
    assert settings.policy == Policy((Rule(("alice",), ("compute.*",)),))
    assert settings.audit == AuditSettings("log", "json", include_params=True)


def test_no_policy_no_audit() -> None:
    settings = merge_settings({}, {})
    assert settings.policy is None
    assert settings.audit is None
    assert settings.expiry_warning_days == 30


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"policy": {"rule": [{"identities": ["a"]}]}}, r"\[\[policy.rule\]\] number 1 of config has no methods"),
        ({"audit": {"format": "xml"}}, r"format in \[audit\] of config must be 'text' or 'json'"),
        ({"expiry_warning_days": 0}, "expiry_warning_days in config must be a whole number of at least 1"),
        ({"metrics_listen": "tcp:9100"}, "metrics_listen 'tcp:9100' in config is not local-only"),
    ],
)
def test_invalid_tables_and_keys(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        merge_settings(values, {})


def test_audit_options(tmp_path: Path) -> None:
    """Any audit option turns the audit log on; a relative --audit-log path is made absolute."""
    options = Options()
    options.parseOptions(["--audit-log", "audit.log", "--audit-params", "--expiry-warning-days", "7"])
    settings = load_settings(options)
    assert settings.audit == AuditSettings(str(Path("audit.log").absolute()), "text", include_params=True)
    assert settings.expiry_warning_days == 7

    options = Options()
    options.parseOptions(["--audit-json"])
    assert load_settings(options).audit == AuditSettings("log", "json")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[policy]\nfoo = 1\n", "in [policy] in config file"),
        ("[[policy.rule]]\nidentities = 5\n", "of config file"),
        ("[audit]\nformat = 'xml'\n", "in [audit] of config file"),
        ("colour = 'blue'\n", "in config file"),
    ],
)
def test_file_only_errors_name_the_file(tmp_path: Path, text: str, names: str) -> None:
    """A policy, an audit table or an unknown key can only come from the file, so the error names only it."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    options = Options()
    options.parseOptions(["--config", str(path)])

    with pytest.raises(ConfigurationError) as caught:
        load_settings(options)
    assert f"{names} {str(path)!r}" in str(caught.value)
    assert "command line" not in str(caught.value)


def test_other_errors_name_both_sources(tmp_path: Path) -> None:
    path = tmp_path / "securerpc.toml"
    path.write_text("max_batch_length = 0\n")
    options = Options()
    options.parseOptions(["--config", str(path)])

    with pytest.raises(ConfigurationError, match="or the command line"):
        load_settings(options)
