"""
End-to-end tests of reloading ``twistd -n securerpc`` with SIGHUP: revoked
clients, a renewed server certificate, a changed policy, and reloads that
fail and change nothing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from netrpc.certs import PKI
from netrpc.exceptions import RemoteError, TLSVerificationError
from netrpc.jsonrpc import FORBIDDEN
from netrpc.verify import Reason
from tests.daemon_process import DaemonProcess
from tests.service_user import client_for, SERVICE_USER, ServiceFiles, privilege_arguments, service_python_path

pytestmark = pytest.mark.e2e

LOOPBACK = "mtls:port=0:interface=127.0.0.1"

POLICY = """
[[policy.rule]]
identities = ["alice"]
methods = ["compute.*", "system.stats"]

[[policy.rule]]
identities = ["bob"]
methods = ["system.health"]
"""


@pytest.fixture
def daemon(files: ServiceFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    """A daemon serving the compute test service with the PKI and config file of ``files``."""
    monkeypatch.setenv("PYTHONPATH", service_python_path())
    arguments = [
        "--config", str(files.config), "--pki", str(files.pki.directory), "--listen", LOOPBACK,
        "--methods", "compute_service:Service", *privilege_arguments(),
    ]
    process = DaemonProcess(arguments, tmp_path)
    yield process
    process.stop(signal.SIGKILL, timeout=10)


@pytest.fixture
def audit_folder() -> Iterator[Path]:
    """A root-owned folder with mode 0755: the service user may read files there but not create any."""
    folder = Path(tempfile.mkdtemp(prefix="netrpc-audit-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def audited_daemon(
    files: ServiceFiles, audit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DaemonProcess]:
    """A daemon like ``daemon`` that writes audit lines to ``audit_folder/audit.log``."""
    monkeypatch.setenv("PYTHONPATH", service_python_path())
    arguments = [
        "--pki", str(files.pki.directory), "--listen", LOOPBACK,
        "--methods", "compute_service:Service", "--audit-log", str(audit_folder / "audit.log"),
        *privilege_arguments(),
    ]
    process = DaemonProcess(arguments, tmp_path)
    yield process
    process.stop(signal.SIGKILL, timeout=10)


def served_certificate(pki: PKI, port: int) -> x509.Certificate:
    """Return the certificate the daemon presents to a new connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.server_ca_cert)
    context.load_cert_chain(pki.client_cert("bob"), pki.client_key("bob"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def wait_for_new_line(daemon: DaemonProcess, pattern: str, start: int, timeout: float = 20.0) -> str:
    """Return the first line matching ``pattern`` among those logged after line ``start``."""
    expression = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.output()
        for line in daemon.lines[start:]:
            if expression.search(line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"daemon did not log {pattern!r} in {timeout} s:\n{daemon.output()}")


def reload(daemon: DaemonProcess, outcome: str) -> str:
    """Send SIGHUP and return the line that reports ``outcome`` ('Reloaded' or 'Reload failed')."""
    start = len(daemon.lines)
    daemon.process.send_signal(signal.SIGHUP)
    line = wait_for_new_line(daemon, "Reloaded TLS material|Reload failed", start)
    assert outcome in line, daemon.output()
    return line


def test_revoked_client_closed(files: ServiceFiles, daemon: DaemonProcess) -> None:
    """After a revocation and SIGHUP, alice's open connection closes and her new handshakes fail; bob's stays."""
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")
    with client_for(files.pki, port, "alice") as alice, client_for(files.pki, port, "bob") as bob:
        assert alice.call("compute.add", 1, 2) == 3
        assert bob.call("system.health")["status"] == "serving"

        assert files.pki.revoke_client("alice")
        files.hand_over()
        reload(daemon, "Reloaded")
        closed = daemon.wait_for_line("Closing connection from .* of 'alice' .* after reload: (.*)")
        assert "revoked" in closed[1]

        assert bob.call("system.health")["status"] == "serving"
        assert bob.stats.connections == 1
        with pytest.raises(TLSVerificationError) as rejected:
            alice.call("compute.add", 1, 2)
        assert rejected.value.reason == Reason.REVOKED
    daemon.wait_for_line("Rejected TLS handshake from 127.0.0.1:\\d+: revoked")


def test_renewed_server_certificate(files: ServiceFiles, daemon: DaemonProcess) -> None:
    """A renewed server certificate is served to new connections while open ones keep going."""
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")
    old = served_certificate(files.pki, port)
    with client_for(files.pki, port, "bob") as bob:
        assert bob.call("system.health")["status"] == "serving"

        files.pki.renew_server(["localhost", "127.0.0.1"])
        files.hand_over()
        reload(daemon, "Reloaded")

        new = served_certificate(files.pki, port)
        assert new.serial_number != old.serial_number
        assert new == x509.load_pem_x509_certificate(files.pki.server_cert.read_bytes())
        assert bob.call("system.health")["status"] == "serving"
        assert bob.stats.connections == 1


def test_failed_reloads_change_nothing(files: ServiceFiles, other_pki: PKI, daemon: DaemonProcess) -> None:
    """A broken policy, then a key that does not match, leave the daemon on its old policy and material."""
    files.write_config(POLICY)
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")
    served = served_certificate(files.pki, port)

    files.write_config(POLICY + "\n[[policy.rule]]\nidentities = ['carol']\n")
    line = reload(daemon, "Reload failed")
    assert "has no methods" in line
    with client_for(files.pki, port, "bob") as bob, client_for(files.pki, port, "alice") as alice:
        with pytest.raises(RemoteError) as refused:
            bob.call("compute.add", 1, 2)
        assert refused.value.code == FORBIDDEN
        assert alice.call("compute.add", 1, 2) == 3

        files.write_config(POLICY)
        key = files.pki.server_key
        key.unlink()
        shutil.copy2(other_pki.server_key, key)
        files.hand_over()
        line = reload(daemon, "Reload failed")
        assert "does not match" in line
        assert served_certificate(files.pki, port) == served
        assert alice.call("system.stats")["reloads"] == {"succeeded": 0, "failed": 2}

    assert daemon.process.poll() is None


def test_policy_reload(files: ServiceFiles, daemon: DaemonProcess) -> None:
    """A reloaded policy applies to open connections, and closes those whose identity lost its rule."""
    files.write_config(POLICY)
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")
    with client_for(files.pki, port, "alice") as alice, client_for(files.pki, port, "bob") as bob:
        assert alice.call("compute.add", 1, 2) == 3
        with pytest.raises(RemoteError):
            bob.call("compute.add", 1, 2)

        files.write_config("[[policy.rule]]\nidentities = ['bob']\nmethods = ['compute.*']\n")
        reload(daemon, "Reloaded")
        daemon.wait_for_line("Access policy: 1 rule; ")
        daemon.wait_for_line("Closing connection from .* of 'alice' .* no rule")

        assert bob.call("compute.add", 1, 2) == 3
        assert bob.stats.connections == 1
        with pytest.raises(RemoteError) as refused:
            alice.call("compute.add", 1, 2)
        assert refused.value.code == FORBIDDEN
        assert alice.stats.connections == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege switch happens only as root")
def test_audit_file_reopened_as_service_user(
    files: ServiceFiles, audit_folder: Path, audited_daemon: DaemonProcess
) -> None:
    """After a start as root with --user, the audit file belongs to that user and SIGHUP reopens it."""
    port = audited_daemon.wait_for_port()
    audited_daemon.wait_for_line("started")
    audit_file = audit_folder / "audit.log"
    assert audit_file.stat().st_uid == pwd.getpwnam(SERVICE_USER).pw_uid

    with client_for(files.pki, port, "alice") as alice:
        assert alice.call("compute.add", 1, 2) == 3
        reload(audited_daemon, "Reloaded")
        assert alice.call("compute.add", 3, 4) == 7
    assert "audit file was not reopened" not in audited_daemon.output()
    assert len(audit_file.read_text().splitlines()) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege switch happens only as root")
def test_audit_reopen_failure_keeps_reload(
    files: ServiceFiles, audit_folder: Path, audited_daemon: DaemonProcess
) -> None:
    """An audit file the service user cannot create again does not hold back a new CRL."""
    port = audited_daemon.wait_for_port()
    audited_daemon.wait_for_line("started")
    audit_file = audit_folder / "audit.log"
    rotated = audit_folder / "audit.log.1"

    with client_for(files.pki, port, "alice") as alice:
        assert alice.call("compute.add", 1, 2) == 3
        # Rotation without a new file: the service user may not create one here.
        audit_file.rename(rotated)
        assert files.pki.revoke_client("bob")
        files.hand_over()
        reload(audited_daemon, "Reloaded")
        audited_daemon.wait_for_line("audit file was not reopened.*Permission denied")

        with client_for(files.pki, port, "bob") as bob:
            with pytest.raises(TLSVerificationError):
                bob.call("system.health")
        assert alice.call("compute.add", 3, 4) == 7

    assert not audit_file.exists()
    assert len(rotated.read_text().splitlines()) == 2
