"""
End-to-end tests of the access policy, the audit log, the counters and the
expiry warnings of ``twistd -n securerpc``.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from netrpc.blocking import Client
from netrpc.certs import PKI, Usage
from netrpc.exceptions import OutcomeUnknown, RemoteError, TLSVerificationError
from netrpc.jsonrpc import FORBIDDEN
from tests.daemon_process import DaemonProcess
from tests.service_user import client_for, ServiceFiles, privilege_arguments, service_python_path

pytestmark = pytest.mark.e2e

LOOPBACK = "mtls:port=0:interface=127.0.0.1"

POLICY = """
[[policy.rule]]
identities = ["alice"]
methods = ["compute.*", "system.listMethods"]

[[policy.rule]]
identities = ["bob"]
methods = ["system.health"]
"""


@pytest.fixture
def start_daemon(files: ServiceFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Start a daemon with the compute test service and the files of ``files``, plus ``arguments``."""
    monkeypatch.setenv("PYTHONPATH", service_python_path())
    started: list[DaemonProcess] = []

    def start(arguments: Sequence[str] = ()) -> DaemonProcess:
        common = [
            "--config", str(files.config), "--pki", str(files.pki.directory), "--listen", LOOPBACK,
            "--methods", "compute_service:Service", *privilege_arguments(),
        ]
        process = DaemonProcess([*common, *arguments], tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL, timeout=10)


def forbidden(client: Client, method: str, *args: object) -> bool:
    """Return whether calling ``method`` fails with the policy's FORBIDDEN error."""
    try:
        client.call(method, *args)
    except RemoteError as error:
        return error.code == FORBIDDEN and error.message == "forbidden"
    return False


def audit_lines(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.output().splitlines() if "[netrpc.audit#info]" in line]


def test_policy_enforced(files: ServiceFiles, start_daemon) -> None:
    """Alice may call compute.* and list them; Bob only system.health; each is refused the rest."""
    files.write_config(POLICY)
    daemon = start_daemon(["--audit-log", "log"])
    port = daemon.wait_for_port()
    assert "2 rules" in daemon.wait_for_line("Access policy: .*").string

    with client_for(files.pki, port, "alice") as alice, client_for(files.pki, port, "bob") as bob:
        assert alice.call("compute.add", 2, 3) == 5
        assert alice.call("system.listMethods") == [
            "compute.add", "compute.sleep", "system.health", "system.listMethods",
        ]
        assert alice.call("system.health")["status"] == "serving"
        assert alice.call("system.health")["instance"] == ""
        assert forbidden(alice, "ping")
        assert forbidden(alice, "system.stats")
        assert forbidden(alice, "system.methodHelp", "ping")

        assert bob.call("system.health")["status"] == "serving"
        assert forbidden(bob, "compute.add", 2, 3)
        assert forbidden(bob, "system.listMethods")
        assert forbidden(bob, "ping")

    refused = daemon.wait_for_line(r"Rejected call to 'compute.add' from 'bob' \(serial [0-9A-F]+\) at 127.0.0.1:\d+")
    assert "access policy does not allow it" in refused.string


def test_identity_connection_cap_seen_by_client(files: ServiceFiles, start_daemon) -> None:
    """Over max_connections the handshake succeeds and the first call fails as a lost connection."""
    files.write_config("[[policy.rule]]\nidentities = ['alice']\nmethods = ['compute.*']\nmax_connections = 1\n")
    daemon = start_daemon()
    port = daemon.wait_for_port()

    with client_for(files.pki, port, "alice") as first, client_for(files.pki, port, "alice") as second:
        assert first.call("compute.add", 1, 2) == 3
        second.connect()
        with pytest.raises(OutcomeUnknown, match="the server closed the connection"):
            second.call("compute.add", 3, 4)
    daemon.wait_for_line("already has 1 connection open, the max_connections of its policy rule")


def test_audit_log(files: ServiceFiles, start_daemon) -> None:
    """Every call, allowed or refused, leaves one audit line with its fields; JSON when asked."""
    files.write_config(POLICY)
    daemon = start_daemon(["--audit-log", "log", "--audit-json"])
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")

    with client_for(files.pki, port, "alice") as alice, client_for(files.pki, port, "bob") as bob:
        alice.call("compute.add", 2, 3)
        forbidden(bob, "compute.add", 4, 5)
        alice.call("compute.sleep", 0.05)
    daemon.wait_for_line("method.:.compute.sleep")

    records = [json.loads(line.split("] ", 1)[1]) for line in audit_lines(daemon)]
    assert [(r["identity"], r["method"], r["outcome"], r.get("code")) for r in records] == [
        ("alice", "compute.add", "ok", None),
        ("bob", "compute.add", "error", FORBIDDEN),
        ("alice", "compute.sleep", "ok", None),
    ]
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert re.fullmatch(r"127\.0\.0\.1:\d+", record["peer"])
        assert re.fullmatch(r"(?:[0-9A-F]{2})+", record["serial"])
        assert "params" not in record
    assert records[2]["duration_ms"] >= 50


def test_counters_and_expiry(files: ServiceFiles, other_pki: PKI, start_daemon) -> None:
    """
    Without a policy the start log warns about it. The counters move with calls and failed
    handshakes, a server certificate that ends within the window gets a warning, and the
    Prometheus listener serves the same counters.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    issued = files.pki.server_authority().issue(
        "localhost", usage=Usage.SERVER, names=["localhost"], not_after=now + datetime.timedelta(days=10)
    )
    files.pki.server_cert.unlink()
    files.pki.server_key.unlink()
    issued.write(files.pki.server_cert, files.pki.server_key)
    files.hand_over()

    daemon = start_daemon(["--expiry-warning-days", "20", "--metrics-listen", "tcp:0:interface=127.0.0.1"])
    port = daemon.wait_for_port()
    assert "No access policy: every certificate from the client CA may call every method" in (
        daemon.wait_for_line("No access policy").string
    )
    warning = daemon.wait_for_line("Expiring soon: server certificate CN=localhost .*").string
    assert "ends in 9 days" in warning
    assert str(files.pki.server_cert) in warning
    metrics_port = int(daemon.wait_for_line(r"Serving counters for Prometheus on 127\.0\.0\.1:(\d+)$")[1])

    with client_for(files.pki, port, "alice") as alice:
        before = alice.call("system.stats")
        alice.call("compute.add", 1, 1)
        with pytest.raises(RemoteError):
            alice.call("compute.add", "one")
        with pytest.raises(TLSVerificationError):
            client_for(other_pki, port, "alice").call("system.health")
        # The client can see the alert before the server has counted the
        # rejection; the log line comes after the count.
        daemon.wait_for_line("Rejected TLS handshake from .*: unknown CA")
        after = alice.call("system.stats")

    assert before["calls"]["total"] == 0
    assert after["calls"]["total"] == 3
    assert after["calls"]["errors"] == {"-32602": 1}
    assert after["calls"]["in_flight"] == 1
    assert after["connections"]["open"] == 1
    assert after["handshakes"]["failed"].get("unknown CA") == 1
    assert after["handshakes"]["completed"] >= 1

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "netrpc_calls_total 4.0" in text
    assert 'netrpc_call_errors_total{code="-32602"} 1.0' in text
    assert 'netrpc_handshake_failures_total{reason="unknown CA"} 1.0' in text
