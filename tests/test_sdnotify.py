"""Tests for netrpc.systemd: notifications over a real AF_UNIX datagram socket,
watchdog timing, credentials, socket activation and journal detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from netrpc import systemd

RECEIVE_TIMEOUT = 5.0


class Receiver:
    """The manager's end of the notification socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def fields(self) -> dict[str, str]:
        message = self.sock.recv(4096).decode("utf-8")
        return dict(line.split("=", 1) for line in message.split("\n"))

    def lines(self) -> list[str]:
        return self.sock.recv(4096).decode("utf-8").split("\n")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT)
        yield Receiver(sock, str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"netrpc-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield Receiver(sock, "@" + name)


class TestNotify:
    def test_without_socket(self) -> None:
        """Outside a Type=notify service nothing is sent."""
        assert systemd.notify({}, READY=1) is False
        assert systemd.notify_ready("up", environ={"NOTIFY_SOCKET": ""}) is False

    def test_ready_with_status(self, receiver: Receiver) -> None:
        assert systemd.notify_ready("Listening on 1 endpoint", receiver.environ())
        assert receiver.lines() == ["READY=1", "STATUS=Listening on 1 endpoint"]

    def test_ready_without_status(self, receiver: Receiver) -> None:
        systemd.notify_ready(environ=receiver.environ())
        assert receiver.lines() == ["READY=1"]

    def test_abstract_socket(self, abstract_receiver: Receiver) -> None:
        assert systemd.notify_ready(environ=abstract_receiver.environ())
        assert abstract_receiver.lines() == ["READY=1"]

    def test_reloading(self, receiver: Receiver) -> None:
        """RELOADING carries the CLOCK_MONOTONIC time in microseconds."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd.notify_reloading("Reloading", receiver.environ())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

        fields = receiver.fields()
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
        assert fields["STATUS"] == "Reloading"

    def test_stopping(self, receiver: Receiver) -> None:
        systemd.notify_stopping(environ=receiver.environ())
        assert receiver.lines() == ["STOPPING=1"]

    def test_status_joins_lines(self, receiver: Receiver) -> None:
        systemd.notify_status("Failed:\nbad key", receiver.environ())
        assert receiver.lines() == ["STATUS=Failed: bad key"]

    def test_watchdog_ping(self, receiver: Receiver) -> None:
        systemd.notify_watchdog(receiver.environ())
        assert receiver.lines() == ["WATCHDOG=1"]

    def test_utf8_status(self, receiver: Receiver) -> None:
        systemd.notify_status("prêt", receiver.environ())
        assert receiver.fields() == {"STATUS": "prêt"}

    def test_invalid_field_name(self, receiver: Receiver) -> None:
        with pytest.raises(ValueError, match="Invalid sd_notify field name 'ready'"):
            systemd.notify(receiver.environ(), ready=1)

    def test_value_with_newline(self, receiver: Receiver) -> None:
        with pytest.raises(ValueError, match="must fit on one line"):
            systemd.notify(receiver.environ(), STATUS="a\nREADY=1")

    def test_no_fields(self, receiver: Receiver) -> None:
        with pytest.raises(ValueError, match="at least one field"):
            systemd.notify(receiver.environ())

    def test_relative_address(self) -> None:
        with pytest.raises(OSError, match="Unsupported NOTIFY_SOCKET='notify'"):
            systemd.notify({"NOTIFY_SOCKET": "notify"}, READY=1)

    def test_missing_socket(self, tmp_path: Path) -> None:
        """A socket that does not exist fails with its address in the message."""
        address = str(tmp_path / "gone")
        with pytest.raises(FileNotFoundError, match="gone"):
            systemd.notify({"NOTIFY_SOCKET": address}, READY=1)


class TestWatchdog:
    def test_off(self) -> None:
        assert systemd.watchdog_interval({}) is None
        assert systemd.watchdog_service({}) is None

    def test_half_the_timeout(self) -> None:
        assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5

    def test_own_pid(self) -> None:
        environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
        assert systemd.watchdog_interval(environ) == 0.5

    def test_other_pid(self) -> None:
        """The watchdog belongs to another process of the service."""
        environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert systemd.watchdog_interval(environ) is None

    @pytest.mark.parametrize(
        ("variable", "value"),
        [("WATCHDOG_USEC", "soon"), ("WATCHDOG_USEC", "0"), ("WATCHDOG_PID", "-1")],
    )
    def test_malformed(self, variable: str, value: str) -> None:
        environ = {"WATCHDOG_USEC": "1000000", variable: value}
        with pytest.raises(ValueError, match=f"Invalid \\${variable}={value!r}"):
            systemd.watchdog_interval(environ)

    def test_service_pings(self, receiver: Receiver) -> None:
        """The service pings once when it starts, then every interval."""
        service = systemd.watchdog_service(receiver.environ(WATCHDOG_USEC="4000000"))
        assert service is not None
        clock = Clock()
        service.clock = clock

        service.startService()
        assert receiver.lines() == ["WATCHDOG=1"]
        clock.advance(1.9)
        clock.advance(0.1)
        assert receiver.lines() == ["WATCHDOG=1"]
        service.stopService()

        clock.advance(10)
        receiver.sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            receiver.sock.recv(4096)


class TestCredentialPath:
    def test_found(self, tmp_path: Path) -> None:
        (tmp_path / "server.key").write_text("not a real key")
        environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
        assert systemd.credential_path("server.key", environ) == tmp_path / "server.key"

    def test_missing_credential(self, tmp_path: Path) -> None:
        environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
        assert systemd.credential_path("server.key.passphrase", environ) is None

    def test_outside_systemd(self) -> None:
        assert systemd.credential_path("server.key", {}) is None

    @pytest.mark.parametrize("name", ["../etc/shadow", "a/b", "..", ""])
    def test_invalid_name(self, name: str, tmp_path: Path) -> None:
        environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
        with pytest.raises(ValueError, match="Invalid credential name"):
            systemd.credential_path(name, environ)


# A child process puts two listening sockets at descriptors 3 and 4, as
# systemd does, and prints what listen_fds() returns.
LISTEN_CHILD = """
import json, os, socket, sys
from netrpc import systemd

os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.environ["LISTEN_PID"] = str(os.getpid())
passed = systemd.listen_fds()
print(json.dumps({
    "passed": passed,
    "ports": [socket.socket(fileno=os.dup(fd)).getsockname()[1] for fd, _ in passed],
    "cloexec": [os.get_inheritable(fd) is False for fd, _ in passed],
    "environ_kept": "LISTEN_FDS" in os.environ,
}))
"""


class TestListenFDs:
    def run_child(self, environ: dict[str, str]) -> dict[str, object]:
        first = socket.create_server(("127.0.0.1", 0))
        second = socket.create_server(("127.0.0.1", 0))
        with first, second:
            fds = (first.fileno(), second.fileno())
            result = subprocess.run(
                [sys.executable, "-c", LISTEN_CHILD, *map(str, fds)],
                env={**os.environ, **environ},
                pass_fds=fds,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            output: dict[str, object] = json.loads(result.stdout)
            output["expected_ports"] = [first.getsockname()[1], second.getsockname()[1]]
        return output

    def test_named_sockets(self) -> None:
        output = self.run_child({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "rpc:admin"})
        assert output["passed"] == [[3, "rpc"], [4, "admin"]]
        assert output["ports"] == output["expected_ports"]
        assert output["cloexec"] == [True, True]
        assert output["environ_kept"] is True

    def test_unnamed_sockets(self) -> None:
        """Without $LISTEN_FDNAMES every socket is named 'unknown'."""
        output = self.run_child({"LISTEN_FDS": "2"})
        assert output["passed"] == [[3, "unknown"], [4, "unknown"]]

    def test_other_pid(self) -> None:
        """Sockets meant for another process are not taken."""
        environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
        assert systemd.listen_fds(environ) == []

    def test_outside_systemd(self) -> None:
        assert systemd.listen_fds({}) == []

    def test_none_passed(self) -> None:
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
        assert systemd.listen_fds(environ) == []

    def test_names_mismatch(self) -> None:
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "rpc"}
        with pytest.raises(ValueError, match="expected 2 names"):
            systemd.listen_fds(environ)

    def test_malformed_count(self) -> None:
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"}
        with pytest.raises(ValueError, match=r"Invalid \$LISTEN_FDS='two'"):
            systemd.listen_fds(environ)


class TestUnderJournal:
    def test_matching_stream(self, tmp_path: Path) -> None:
        with open(tmp_path / "stream", "w") as stream:
            stat = os.fstat(stream.fileno())
            environ = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
            assert systemd.under_journal(stream.fileno(), environ) is True

    def test_other_stream(self, tmp_path: Path) -> None:
        """Output redirected away from the journal is no longer the journal."""
        with open(tmp_path / "stream", "w") as stream:
            stat = os.fstat(stream.fileno())
            environ = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}
            assert systemd.under_journal(stream.fileno(), environ) is False

    @pytest.mark.parametrize("value", ["", "12", "a:b", "1:2:3"])
    def test_malformed(self, value: str) -> None:
        assert systemd.under_journal(1, {"JOURNAL_STREAM": value}) is False

    def test_closed_descriptor(self, tmp_path: Path) -> None:
        with open(tmp_path / "stream", "w") as stream:
            fd = stream.fileno()
            stat = os.fstat(fd)
        environ = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert systemd.under_journal(fd, environ) is False


class TestJournalFormat:
    def test_info(self) -> None:
        event = {
            "log_format": "Listening on {address}",
            "address": "127.0.0.1:8700",
            "log_level": LogLevel.info,
            "log_namespace": "netrpc.daemon",
            "log_time": 0.0,
        }
        assert systemd.format_journal_event(event) == (
            "<6>[netrpc.daemon] Listening on 127.0.0.1:8700\n"
        )

    def test_failure_lines(self) -> None:
        """Each traceback line carries the error priority."""
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            failure = Failure()
        event = {
            "log_format": "Call failed",
            "log_level": LogLevel.error,
            "log_system": "RPC,3,127.0.0.1",
            "log_failure": failure,
            "log_time": 0.0,
        }
        text = systemd.format_journal_event(event)
        assert text is not None
        lines = text.rstrip("\n").split("\n")
        assert lines[0] == "<3>[RPC,3,127.0.0.1] Call failed"
        assert len(lines) > 2
        assert all(line.startswith("<3>") for line in lines)
        assert "RuntimeError: boom" in text

    def test_unformattable(self) -> None:
        assert systemd.format_journal_event({"log_time": 0.0}) is None


# A child process whose standard output is a file that $JOURNAL_STREAM
# names, as systemd sets it up with StandardOutput=journal.
OBSERVER_CHILD = """
import os, sys
from twisted.logger import LogLevel
from netrpc import systemd

stat = os.fstat(1)
os.environ["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
if sys.argv[1] == "unset":
    del os.environ["JOURNAL_STREAM"]
observer = systemd.journal_observer()
observer({"log_format": "ready", "log_level": LogLevel.warn,
          "log_namespace": "netrpc", "log_time": 86400.0})
"""


class TestJournalObserver:
    def run_child(self, tmp_path: Path, mode: str) -> str:
        output = tmp_path / "stdout"
        with open(output, "w") as stdout:
            subprocess.run(
                [sys.executable, "-c", OBSERVER_CHILD, mode],
                stdout=stdout,
                env={**os.environ, "TZ": "UTC"},
                timeout=30,
                check=True,
            )
        return output.read_text()

    def test_journal(self, tmp_path: Path) -> None:
        assert self.run_child(tmp_path, "journal") == "<4>[netrpc] ready\n"

    def test_timestamps_elsewhere(self, tmp_path: Path) -> None:
        """Output that is not the journal keeps twistd's timestamps."""
        text = self.run_child(tmp_path, "unset")
        assert text.endswith(" [netrpc#warn] ready\n")
        assert text.startswith("1970-01-02")
