"""Tests for audit line formats, the [audit] table and where lines are written."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from netrpc import jsonrpc
from netrpc.audit import (
    AuditLog,
    AuditRecord,
    AuditSettings,
    caller_fields,
    format_json,
    format_text,
    open_audit_file,
    parse_audit_settings,
)
from netrpc.exceptions import ConfigurationError
from netrpc.identity import PeerIdentity, format_serial

ALICE = PeerIdentity("alice", serial=0x1F2E, address="127.0.0.1:50312")
# 2025-03-01T12:00:00.125Z
STARTED = 1740830400.125


def record(
    method: str = "compute.add",
    reply: jsonrpc.Reply | None = None,
    identity: PeerIdentity | None = ALICE,
) -> AuditRecord:
    return AuditRecord(
        started=STARTED,
        peer="127.0.0.1:50312",
        identity=identity,
        method=method,
        params=[2, {"password": "hunter2"}],
        reply=jsonrpc.result_reply(1, 5) if reply is None else reply,
        duration=0.000412,
    )


FORBIDDEN_REPLY = jsonrpc.error_reply(1, jsonrpc.FORBIDDEN, "forbidden")

# One key=value pair of a text line: a bare value or a JSON string.
_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:\\.|[^"\\])*"|\S+)')


class TestText:
    def test_ok(self) -> None:
        assert format_text(record()) == (
            "time=2025-03-01T12:00:00.125Z peer=127.0.0.1:50312 identity=alice serial=1F2E "
            "method=compute.add outcome=ok duration_ms=0.412"
        )

    def test_error(self) -> None:
        line = format_text(record(reply=FORBIDDEN_REPLY))
        assert " outcome=error code=-32003 duration_ms=" in line

    def test_lost(self) -> None:
        line = format_text(AuditRecord(STARTED, "p:1", ALICE, "m", [], None, 1.0))
        assert " outcome=lost duration_ms=1000.0" in line

    def test_no_params_by_default(self) -> None:
        assert "hunter2" not in format_text(record())

    def test_params(self) -> None:
        line = format_text(record(), include_params=True)
        assert line.endswith(' params=[2,{"password":"hunter2"}] result=5')

    def test_error_details(self) -> None:
        line = format_text(record(reply=FORBIDDEN_REPLY), include_params=True)
        assert line.endswith(' error={"code":-32003,"message":"forbidden"}')

    def test_hostile_method_quoted(self) -> None:
        """A method name with spaces, '=' or a newline cannot forge fields or lines."""
        method = 'x outcome=ok\nidentity=root "'
        line = format_text(record(method=method))
        assert "\n" not in line

        pairs = _LOGFMT_PAIR.findall(line)
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys))
        fields = dict(pairs)
        assert json.loads(fields["method"]) == method
        assert fields["identity"] == "alice"

    def test_no_identity(self) -> None:
        line = format_text(record(identity=None))
        assert " identity=- serial=- " in line


class TestJSON:
    def test_fields(self) -> None:
        data = json.loads(format_json(record(reply=FORBIDDEN_REPLY)))
        assert data == {
            "time": "2025-03-01T12:00:00.125Z",
            "peer": "127.0.0.1:50312",
            "identity": "alice",
            "serial": "1F2E",
            "method": "compute.add",
            "outcome": "error",
            "code": -32003,
            "duration_ms": 0.412,
        }

    def test_params(self) -> None:
        data = json.loads(format_json(record(), include_params=True))
        assert data["params"] == [2, {"password": "hunter2"}]
        assert data["result"] == 5

    def test_one_line(self) -> None:
        assert "\n" not in format_json(record(method="a\nb"), include_params=True)

    def test_unencodable_result(self) -> None:
        """A result the reply could not carry is written as its repr, not dropped."""
        line = format_json(record(reply=jsonrpc.result_reply(1, {1, 2})), include_params=True)
        assert json.loads(line)["result"] == "{1, 2}"


def reference_fields(record: AuditRecord, include_params: bool) -> dict[str, Any]:
    """The fields of a line as the formatter built them before callers were cached."""
    identity = record.identity
    fields: dict[str, Any] = {
        "time": _timestamp_reference(record.started),
        "peer": record.peer,
        "identity": identity.common_name if identity is not None else None,
        "serial": format_serial(identity.serial) if identity is not None else None,
        "method": record.method,
        "outcome": record.outcome,
    }
    if record.error_code is not None:
        fields["code"] = record.error_code
    fields["duration_ms"] = round(record.duration * 1000, 3)
    if include_params:
        fields["params"] = record.params
        if record.reply is not None and "error" in record.reply:
            fields["error"] = record.reply["error"]
        elif record.reply is not None:
            fields["result"] = record.reply.get("result")
    return fields


def _timestamp_reference(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_reference(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=repr)


def reference_text(record: AuditRecord, include_params: bool) -> str:
    parts = []
    for key, value in reference_fields(record, include_params).items():
        if value is None:
            text = "-"
        elif key in ("params", "result", "error"):
            text = _json_reference(value)
        else:
            text = str(value)
            if not re.fullmatch(r"[A-Za-z0-9_.:/@+*\-\[\]]+", text):
                text = _json_reference(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
REPLIES = st.one_of(
    st.none(),
    st.builds(jsonrpc.result_reply, st.just(1), JSON_VALUES),
    st.builds(jsonrpc.error_reply, st.just(1), st.integers(-32768, 32767), st.text()),
)
IDENTITIES = st.none() | st.builds(
    PeerIdentity, st.text(), serial=st.integers(0, 2**160), address=st.text(max_size=5)
)
RECORDS = st.builds(
    AuditRecord,
    started=st.floats(0, 4e9),
    peer=st.text(),
    identity=IDENTITIES,
    method=st.text(),
    params=JSON_VALUES,
    reply=REPLIES,
    duration=st.floats(0, 1e7),
)


class TestCachedCaller:
    """Lines made with cached caller fields match the formatter that formats them per call."""

    @given(RECORDS, st.booleans())
    def test_text(self, audit_record: AuditRecord, include_params: bool) -> None:
        caller = caller_fields(audit_record.peer, audit_record.identity)
        expected = reference_text(audit_record, include_params)
        assert format_text(audit_record, include_params=include_params, caller=caller) == expected
        assert format_text(audit_record, include_params=include_params) == expected

    @given(RECORDS, st.booleans())
    def test_json(self, audit_record: AuditRecord, include_params: bool) -> None:
        caller = caller_fields(audit_record.peer, audit_record.identity)
        expected = _json_reference(reference_fields(audit_record, include_params))
        assert format_json(audit_record, include_params=include_params, caller=caller) == expected
        assert format_json(audit_record, include_params=include_params) == expected


class TestSettings:
    def test_defaults(self) -> None:
        assert parse_audit_settings({}) == AuditSettings("log", "text", False)

    def test_values(self) -> None:
        table = {"destination": "/var/log/audit.log", "format": "json", "include_params": True}
        assert parse_audit_settings(table) == AuditSettings("/var/log/audit.log", "json", True)

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ({"file": "x"}, r"unknown key 'file' in \[audit\] of test.toml"),
            ({"destination": "audit.log"}, "must be an absolute path"),
            ({"destination": ""}, "must be 'log' or a file path"),
            ({"format": "xml"}, "must be 'text' or 'json', not 'xml'"),
            ({"include_params": "yes"}, "must be true or false, not 'yes'"),
        ],
    )
    def test_invalid(self, table: dict[str, object], message: str) -> None:
        with pytest.raises(ConfigurationError, match=message):
            parse_audit_settings(table, "test.toml")


def opening_outcome(path: Path, owner: tuple[int, int] | None) -> BaseException | None:
    """Open ``path`` as the audit file in a thread; return its error, or fail if it blocks."""
    outcome: list[BaseException | None] = []

    def opening() -> None:
        try:
            open_audit_file(path, owner=owner).close()
            outcome.append(None)
        except BaseException as error:  # noqa: B902 - returned to the test
            outcome.append(error)

    thread = threading.Thread(target=opening, daemon=True)
    thread.start()
    thread.join(5.0)
    if thread.is_alive():
        # A reader releases a blocked open, so no thread is left behind.
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(5.0)
        os.close(reader)
        pytest.fail(f"opening {str(path)!r} blocked")
    return outcome[0]


class TestAuditLog:
    def test_to_log(self) -> None:
        audit = AuditLog(AuditSettings())
        with capturedLogs() as events:
            audit.record(record())
        assert len(events) == 1
        assert events[0]["log_namespace"] == "netrpc.audit"
        assert events[0]["audit_line"] == format_text(record())

    def test_to_file(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        audit = AuditLog(AuditSettings(str(path), "json"))
        audit.record(record())
        audit.record(record(reply=FORBIDDEN_REPLY))
        audit.close()

        lines = path.read_text().splitlines()
        assert [json.loads(line)["outcome"] for line in lines] == ["ok", "error"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def test_reopen(self, tmp_path: Path) -> None:
        """After rotation, reopen() starts a new file at the same path."""
        path = tmp_path / "audit.log"
        audit = AuditLog(AuditSettings(str(path)))
        audit.record(record())
        path.rename(tmp_path / "audit.log.1")
        audit.reopen()
        audit.record(record(method="second"))
        audit.close()

        assert "method=compute.add" in (tmp_path / "audit.log.1").read_text()
        assert "method=second" in path.read_text()

    def test_reopen_failure_keeps_old_file(self, tmp_path: Path) -> None:
        directory = tmp_path / "logs"
        directory.mkdir()
        path = directory / "audit.log"
        audit = AuditLog(AuditSettings(str(path)))
        path.rename(tmp_path / "kept.log")
        directory.rmdir()

        with pytest.raises(ConfigurationError, match="cannot open audit file"):
            audit.reopen()
        audit.record(record())
        audit.close()
        assert "method=compute.add" in (tmp_path / "kept.log").read_text()

    def test_symbolic_link_rejected(self, tmp_path: Path) -> None:
        """Without an owner too, the audit path is not followed when it is a link."""
        target = tmp_path / "elsewhere.log"
        target.touch()
        (tmp_path / "audit.log").symlink_to(target)

        with pytest.raises(ConfigurationError, match="is a symbolic link"):
            AuditLog(AuditSettings(str(tmp_path / "audit.log")))

    def test_symbolic_link_rejected_at_reopen(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        target = tmp_path / "elsewhere.log"
        target.touch()
        audit = AuditLog(AuditSettings(str(path)), owner=(os.getuid(), os.getgid()))
        path.unlink()
        path.symlink_to(target)

        with pytest.raises(ConfigurationError, match="is a symbolic link"):
            audit.reopen()
        audit.record(record())
        audit.close()
        assert target.read_text() == ""

    @pytest.mark.parametrize("owner", [None, (65534, 65534)])
    def test_fifo_rejected(self, tmp_path: Path, owner: tuple[int, int] | None) -> None:
        """A FIFO at the path fails at once instead of blocking until a reader comes."""
        fifo = tmp_path / "audit.log"
        os.mkfifo(fifo)

        error = opening_outcome(fifo, owner)

        assert isinstance(error, ConfigurationError)
        assert "is not a regular file" in str(error)
        assert repr(str(fifo)) in str(error)

    def test_fifo_with_reader_rejected(self, tmp_path: Path) -> None:
        fifo = tmp_path / "audit.log"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            error = opening_outcome(fifo, None)
        finally:
            os.close(reader)

        assert isinstance(error, ConfigurationError)
        assert "is not a regular file" in str(error)

    def test_fifo_rejected_at_reopen(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        audit = AuditLog(AuditSettings(str(path)))
        path.unlink()
        os.mkfifo(path)

        with pytest.raises(ConfigurationError, match="is not a regular file"):
            audit.reopen()
        audit.close()

    def test_file_blocking(self, tmp_path: Path) -> None:
        """The file is opened without blocking but written in blocking mode."""
        opened = open_audit_file(tmp_path / "audit.log")
        try:
            assert os.get_blocking(opened.fileno())
        finally:
            opened.close()

    def test_missing_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="check that its directory exists"):
            AuditLog(AuditSettings(str(tmp_path / "absent" / "audit.log")))


_nobody = pwd.getpwnam("nobody")
NOBODY = (_nobody.pw_uid, _nobody.pw_gid)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")


@needs_root
class TestOwner:
    def test_new_file_given_to_owner(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        AuditLog(AuditSettings(str(path)), owner=NOBODY).close()

        status = path.stat()
        assert (status.st_uid, status.st_gid) == NOBODY
        assert stat.S_IMODE(status.st_mode) == 0o640

    def test_root_file_given_to_owner(self, tmp_path: Path) -> None:
        """A file left by an earlier start as root goes to the service user too."""
        path = tmp_path / "audit.log"
        path.write_text("earlier\n")
        AuditLog(AuditSettings(str(path)), owner=NOBODY).close()

        assert path.stat().st_uid == NOBODY[0]
        assert path.read_text() == "earlier\n"

    def test_other_user_file_unchanged(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        path.touch()
        os.chown(path, 1, 1)
        AuditLog(AuditSettings(str(path)), owner=NOBODY).close()

        assert (path.stat().st_uid, path.stat().st_gid) == (1, 1)

    def test_symbolic_link_rejected(self, tmp_path: Path) -> None:
        target = tmp_path / "precious"
        target.touch()
        link = tmp_path / "audit.log"
        link.symlink_to(target)

        with pytest.raises(ConfigurationError, match="is a symbolic link"):
            AuditLog(AuditSettings(str(link)), owner=NOBODY)
        assert target.stat().st_uid == 0

    def test_hard_link_rejected(self, tmp_path: Path) -> None:
        target = tmp_path / "precious"
        target.touch()
        link = tmp_path / "audit.log"
        os.link(target, link)

        with pytest.raises(ConfigurationError, match="has 2 hard links"):
            AuditLog(AuditSettings(str(link)), owner=NOBODY)
        assert target.stat().st_uid == 0

    def test_without_owner_unchanged(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.log"
        AuditLog(AuditSettings(str(path))).close()

        assert path.stat().st_uid == 0
