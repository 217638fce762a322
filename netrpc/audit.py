"""
The audit log: one line per call, saying when it started, from which
address and certificate, which method, how it ended and how long it took.

Two formats: ``key=value`` text (logfmt style) for people, and JSON lines
for log shippers. A text line reads::

    time=2025-03-01T12:00:00.125Z peer=127.0.0.1:50312 identity=alice
    serial=5F1C... method=compute.add outcome=ok duration_ms=0.412

(on one line). ``outcome`` is ``ok``, ``error`` (with ``code``, the
JSON-RPC error code) or ``lost`` when the connection closed before the
reply. Params, results and error details are left out unless
``include_params`` is set, because they may contain secrets.

Lines go to the daemon's own log under the ``netrpc.audit`` namespace (the
journal, under systemd) or to a file of their own.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.logger import Logger

from netrpc._plural import plural
from netrpc.exceptions import ConfigurationError
from netrpc.identity import PeerIdentity, format_serial
from netrpc.jsonrpc import Reply

__all__ = [
    "LOG_DESTINATION",
    "AuditLog",
    "AuditRecord",
    "AuditSettings",
    "CallerFields",
    "caller_fields",
    "format_json",
    "format_text",
    "parse_audit_settings",
]

# The destination that means "the daemon's own log" rather than a file.
LOG_DESTINATION = "log"
LOG_NAMESPACE = "netrpc.audit"

# A new audit file is readable by the service's group, for log readers,
# and by no one else.
FILE_MODE = 0o640

# After the first failed write to an audit file, one error line per this
# many failures, so a full disk does not flood the daemon's log.
WRITE_ERROR_LOG_EVERY = 1000

_AUDIT_KEYS = ("destination", "format", "include_params")
_FORMATS = ("text", "json")

# Text values made only of these characters are written bare; any other
# value (spaces, quotes, '=', control characters) is written as a JSON
# string, so a client-chosen method name cannot forge a field or a line.
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+*\-\[\]]+")


@dataclass(frozen=True)
class AuditSettings:
    """
    The ``[audit]`` table: ``destination`` is ``"log"`` or the path of a
    file, ``format`` is ``"text"`` or ``"json"``.
    """

    destination: str = LOG_DESTINATION
    format: str = "text"
    include_params: bool = False


def parse_audit_settings(table: Mapping[str, Any], source: str = "the config file") -> AuditSettings:
    """Check the raw ``[audit]`` table and build ``AuditSettings``; raise ``ConfigurationError``."""
    unknown = sorted(set(table) - set(_AUDIT_KEYS))
    if unknown:
        raise ConfigurationError(
            f"unknown key {unknown[0]!r} in [audit] of {source}; known keys: {', '.join(_AUDIT_KEYS)}"
        )

    destination = table.get("destination", LOG_DESTINATION)
    if not isinstance(destination, str) or not destination:
        raise ConfigurationError(
            f"destination in [audit] of {source} must be {LOG_DESTINATION!r} or a file path, "
            f"not {destination!r}"
        )
    if destination != LOG_DESTINATION and not Path(destination).is_absolute():
        raise ConfigurationError(
            f"destination {destination!r} in [audit] of {source} must be an absolute path, "
            "because the daemon may run from another directory"
        )

    form = table.get("format", "text")
    if form not in _FORMATS:
        raise ConfigurationError(f"format in [audit] of {source} must be 'text' or 'json', not {form!r}")
    include_params = table.get("include_params", False)
    if type(include_params) is not bool:
        raise ConfigurationError(
            f"include_params in [audit] of {source} must be true or false, not {include_params!r}"
        )
    return AuditSettings(destination, form, include_params)


@dataclass(frozen=True)
class AuditRecord:
    """
    One finished or refused call. ``started`` is in POSIX seconds and
    ``duration`` in seconds; ``reply`` is None when the connection was lost
    before the call ended.
    """

    started: float
    peer: str
    identity: PeerIdentity | None
    method: str
    params: Any
    reply: Reply | None
    duration: float

    @property
    def outcome(self) -> str:
        """``ok``, ``error`` or ``lost``."""
        if self.reply is None:
            return "lost"
        return "error" if "error" in self.reply else "ok"

    @property
    def error_code(self) -> int | None:
        """The JSON-RPC error code, or None when the call did not fail."""
        if self.reply is None or "error" not in self.reply:
            return None
        code: int = self.reply["error"]["code"]
        return code


def _timestamp(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class CallerFields:
    """
    The ``peer``, ``identity`` and ``serial`` fields of a line, formatted
    once per connection in both formats: ``text`` as ``key=value`` pairs and
    ``json`` as the members of a JSON object, without the braces.
    """

    text: str
    json: str


def caller_fields(peer: str, identity: PeerIdentity | None) -> CallerFields:
    """Format the fields that stay the same for every call on one connection."""
    name = identity.common_name if identity is not None else None
    serial = format_serial(identity.serial) if identity is not None else None
    text = f"peer={_text_value(peer)} identity={_text_value(name)} serial={_text_value(serial)}"
    json_members = f'"peer":{_to_json(peer)},"identity":{_to_json(name)},"serial":{_to_json(serial)}'
    return CallerFields(text=text, json=json_members)


def _call_fields(record: AuditRecord, include_params: bool) -> dict[str, Any]:
    """Return the fields of a line that follow the caller's, in their order."""
    fields: dict[str, Any] = {"method": record.method, "outcome": record.outcome}
    code = record.error_code
    if code is not None:
        fields["code"] = code
    fields["duration_ms"] = round(record.duration * 1000, 3)

    if include_params:
        fields["params"] = record.params
        if record.reply is not None and "error" in record.reply:
            fields["error"] = record.reply["error"]
        elif record.reply is not None:
            fields["result"] = record.reply.get("result")
    return fields


# Built once: json.dumps with options builds a new encoder on every call.
_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=repr)


def _to_json(value: Any) -> str:
    # Results were encoded for the reply already; the fallback only covers
    # a result the reply could not carry, which the client got as an error.
    return _JSON.encode(value)


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if _BARE_VALUE.fullmatch(text) else _to_json(text)


def format_json(
    record: AuditRecord, *, include_params: bool = False, caller: CallerFields | None = None
) -> str:
    """
    Format ``record`` as one JSON object on one line. ``caller`` is what
    ``caller_fields`` gave for the record's peer and identity, when cached.
    """
    if caller is None:
        caller = caller_fields(record.peer, record.identity)
    # A timestamp holds only digits and "-:.TZ", which JSON leaves as they are.
    time = _timestamp(record.started)
    rest = _to_json(_call_fields(record, include_params))
    return f'{{"time":"{time}",{caller.json},{rest[1:]}'


def format_text(
    record: AuditRecord, *, include_params: bool = False, caller: CallerFields | None = None
) -> str:
    """
    Format ``record`` as ``key=value`` pairs; odd values are quoted as JSON
    strings. ``caller`` is as for ``format_json``.
    """
    if caller is None:
        caller = caller_fields(record.peer, record.identity)
    parts = [f"time={_timestamp(record.started)}", caller.text]
    for key, value in _call_fields(record, include_params).items():
        if key == "method":
            text = _text_value(value)
        elif key in ("params", "result", "error"):
            text = "-" if value is None else _to_json(value)
        else:
            # The outcome is a fixed word and the rest are numbers: str() of an
            # int or float uses only digits, letters and "+-.", all bare.
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class AuditLog:
    """
    Writes audit records to the daemon's log (``netrpc.audit``) or to a
    file. A file is opened at once, so a wrong path fails the start, and
    ``reopen()`` reopens it after log rotation.

    ``owner`` is the ``(uid, gid)`` a daemon started as root switches to.
    The file then goes to that user, so that ``reopen()`` can open it again
    after the switch.
    """

    def __init__(
        self,
        settings: AuditSettings,
        *,
        log: Logger | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.log = log or Logger(namespace=LOG_NAMESPACE)
        self._format = format_json if settings.format == "json" else format_text
        self._file: IO[str] | None = None
        self._write_errors = 0
        if settings.destination != LOG_DESTINATION:
            self._file = open_audit_file(Path(settings.destination), owner=owner)

    def record(self, record: AuditRecord, *, caller: CallerFields | None = None) -> None:
        """
        Write one line for ``record``. ``caller``, from ``caller_fields``,
        spares formatting the caller's fields again for each call of a connection.
        """
        line = self._format(record, include_params=self.settings.include_params, caller=caller)
        if self._file is None:
            self.log.info("{audit_line}", audit_line=line)
            return
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as error:
            self._report_write_error(error)

    def _report_write_error(self, error: OSError) -> None:
        self._write_errors += 1
        if self._write_errors % WRITE_ERROR_LOG_EVERY == 1:
            self.log.error(
                "Cannot write to audit file {path}: {reason} ({lost} lost so far)",
                path=self.settings.destination,
                reason=error.strerror or str(error),
                lost=plural(self._write_errors, "line"),
                count=self._write_errors,
            )

    def reopen(self) -> None:
        """
        Open the audit file again by its path, as after rotation. Raise
        ``ConfigurationError`` and keep writing to the old file when that fails.
        """
        if self._file is None:
            return
        new_file = open_audit_file(Path(self.settings.destination))
        old_file, self._file = self._file, new_file
        old_file.close()

    def close(self) -> None:
        """Close the audit file, if there is one."""
        if self._file is not None:
            self._file.close()
            self._file = None


def open_audit_file(path: Path, *, owner: tuple[int, int] | None = None) -> IO[str]:
    """
    Open ``path`` for appending, creating it with mode 0640; raise ``ConfigurationError``.

    Only a regular file is opened, never through a symbolic link. With
    ``owner``, give a root-owned file to that ``(uid, gid)``; see ``_hand_over``.
    """
    # The service user may control the file's folder, so a link planted
    # there is not followed, at start or at a reload. O_NONBLOCK keeps a
    # FIFO at the path from blocking the open until a reader comes.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags, FILE_MODE)
    except OSError as error:
        raise ConfigurationError(_open_error(path, error)) from None

    try:
        _check_regular(descriptor, path)
        os.set_blocking(descriptor, True)
        if owner is not None:
            _hand_over(descriptor, path, owner)
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "a", encoding="utf-8")


def _open_error(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return (
            f"cannot open audit file {str(path)!r}: it is a symbolic link, which the daemon "
            "does not follow, because it reopens the file at each reload and may give it to "
            "the service user; name the real path"
        )
    if error.errno == errno.ENXIO:
        # What a FIFO without a reader, or a socket, gives with O_NONBLOCK.
        return _not_regular(path)
    return (
        f"cannot open audit file {str(path)!r}: {error.strerror}; check that its "
        "directory exists and that the daemon's user may write there"
    )


def _not_regular(path: Path) -> str:
    return (
        f"audit file {str(path)!r} is not a regular file (such as a FIFO, socket or device); "
        "name a file path"
    )


def _check_regular(descriptor: int, path: Path) -> None:
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        raise ConfigurationError(_not_regular(path))


def _hand_over(descriptor: int, path: Path, owner: tuple[int, int]) -> None:
    """
    Give the open audit file to ``owner`` when root owns it, so that the
    service user can reopen it at each reload. A file that another user
    already owns stays as it is.
    """
    status = os.fstat(descriptor)
    if status.st_uid != 0 or (status.st_uid, status.st_gid) == owner:
        return
    if status.st_nlink != 1:
        # A second name may be a hard link to a file the service user must not own.
        raise ConfigurationError(
            f"audit file {str(path)!r} has {status.st_nlink} hard links; "
            "name a file with a single link, or remove it so the daemon creates it"
        )
    uid, gid = owner
    try:
        os.fchown(descriptor, uid, gid)
    except OSError as error:
        raise ConfigurationError(
            f"cannot give audit file {str(path)!r} to uid {uid} gid {gid}: {error.strerror}"
        ) from None
