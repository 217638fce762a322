"""
The daemon's settings: defaults, the TOML config file and command-line
overrides, merged into one validated ``Settings`` object.

Every setting has a key in the config file and a command-line option with the
same name (``max_message_size`` in the file is ``--max-message-size`` on the
command line). The command line wins over the file, and the file wins over
the defaults below.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from netrpc.audit import AuditSettings, parse_audit_settings
from netrpc.exceptions import ConfigurationError
from netrpc.policy import Policy, parse_policy
from netrpc.stats import check_metrics_listen

# The default listen address is loopback only: exposing the daemon to a
# network is a decision the operator makes by naming an interface.
DEFAULT_LISTEN = "mtls:port=8700:interface=127.0.0.1"

# Thirty days leave time to renew a certificate or CRL through a normal
# change process after the first warning.
DEFAULT_EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class Limits:
    """
    Resource bounds of the server. Sizes are in bytes and times in seconds.
    """

    # 1 MiB fits any sensible call while keeping one hostile frame cheap.
    max_message_size: int = 1024 * 1024
    max_batch_length: int = 100
    max_in_flight: int = 64
    max_connections: int = 1000
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    call_timeout: float = 60.0
    # Four maximum-size replies may wait for a slow reader, no more.
    max_unsent_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs to start, after merging file and options."""

    listen: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    pki: Path | None = None
    passphrase_file: Path | None = None
    user: str | None = None
    group: str | None = None
    instance: str = ""
    limits: Limits = field(default_factory=Limits)
    # None: no access policy, every certificate from the client CA may
    # call every method. None for audit: no audit log.
    policy: Policy | None = None
    audit: AuditSettings | None = None
    expiry_warning_days: int = DEFAULT_EXPIRY_WARNING_DAYS
    metrics_listen: str | None = None


_LIMIT_TYPES: dict[str, type] = {
    item.name: int if isinstance(item.default, int) else float for item in fields(Limits)
}
_TYPE_NAMES = {int: "a whole number", float: "a number"}
_LIST_KEYS = {"listen", "methods"}
_PATH_KEYS = {"pki", "passphrase_file"}
_TEXT_KEYS = {"user", "group", "instance", "metrics_listen"}
_COUNT_KEYS = {"expiry_warning_days"}
_TABLE_KEYS = {"policy", "audit"}
KNOWN_KEYS = (
    frozenset(_LIMIT_TYPES) | _LIST_KEYS | _PATH_KEYS | _TEXT_KEYS | _COUNT_KEYS | _TABLE_KEYS
)


def read_config_file(path: Path) -> dict[str, Any]:
    """
    Read a TOML config file and return its raw keys.

    Raises ``ConfigurationError`` when the file is missing, unreadable or not
    valid TOML.
    """
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigurationError(
            f"config file {str(path)!r} not found; pass an existing file to --config"
        ) from None
    except OSError as error:
        raise ConfigurationError(
            f"cannot read config file {str(path)!r}: {error.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def merge_settings(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    source: str = "config",
    file_source: str | None = None,
) -> Settings:
    """
    Merge config-file values and command-line overrides into ``Settings``.

    ``overrides`` contains only the options the user gave, and ``None``
    values are ignored. An ``audit`` override is a partial table whose keys
    replace those of the file's ``[audit]``. Unknown keys and values of the wrong
    type raise ``ConfigurationError`` naming the key.

    ``source`` names where values came from in error messages, and
    ``file_source`` (default ``source``) names the config file alone, for
    what only the file can hold: unknown keys and the ``[policy]`` and
    ``[audit]`` tables.
    """
    file_source = file_source or source
    unknown = sorted(set(file_values) - KNOWN_KEYS)
    if unknown:
        raise ConfigurationError(
            f"unknown key {unknown[0]!r} in {file_source}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
        )

    merged = dict(file_values)
    merged.update({key: value for key, value in overrides.items() if value is not None})
    if isinstance(file_values.get("audit"), Mapping) and overrides.get("audit"):
        merged["audit"] = {**file_values["audit"], **overrides["audit"]}

    # Each value has its own field's type; a single dict type cannot express that.
    limit_values: dict[str, Any] = {
        key: _convert_limit(key, merged[key], source) for key in _LIMIT_TYPES if key in merged
    }
    limits = Limits(**limit_values)
    values: dict[str, Any] = {"limits": limits}
    for key in _LIST_KEYS & merged.keys():
        values[key] = _convert_list(key, merged[key], source)
    for key in _PATH_KEYS & merged.keys():
        values[key] = Path(_convert_text(key, merged[key], source))
    for key in _TEXT_KEYS & merged.keys():
        values[key] = _convert_text(key, merged[key], source)
    for key in _COUNT_KEYS & merged.keys():
        values[key] = _convert_count(key, merged[key], source)
    if "policy" in merged:
        table = _convert_table("policy", merged["policy"], file_source)
        values["policy"] = parse_policy(table, file_source)
    if "audit" in merged:
        table = _convert_table("audit", merged["audit"], file_source)
        values["audit"] = parse_audit_settings(table, file_source)
    if "metrics_listen" in values:
        check_metrics_listen(values["metrics_listen"], source)
    return replace(Settings(), **values)


def _convert_limit(key: str, value: Any, source: str) -> int | float:
    expected = _LIMIT_TYPES[key]
    invalid = ConfigurationError(
        f"{key} in {source} must be {_TYPE_NAMES[expected]} above 0, not {value!r}"
    )
    if isinstance(value, bool):
        raise invalid
    try:
        # Parsing as float first rejects "2.5" for a whole-number limit
        # instead of cutting it to 2.
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise invalid from None
    if not math.isfinite(number) or number <= 0:
        raise invalid
    if expected is int:
        if not number.is_integer():
            raise invalid
        return int(number)
    return number


def _convert_count(key: str, value: Any, source: str) -> int:
    if type(value) is str and value.isdigit():
        value = int(value)
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{key} in {source} must be a whole number of at least 1, not {value!r}")
    return value


def _convert_list(key: str, value: Any, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigurationError(f"{key} in {source} must be a list of strings, not {value!r}")
    return tuple(value)


def _convert_text(key: str, value: Any, source: str) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigurationError(f"{key} in {source} must be a non-empty string, not {value!r}")
    return str(value)


def _convert_table(key: str, value: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"[{key}] in {source} must be a table, not {value!r}")
    return value
