"""
End-to-end tests of ``twistd -n securerpc`` as a separate process: start,
calls over mutual TLS, privilege rules, start-up errors, reload and stop.
"""

from __future__ import annotations

import datetime
import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from netrpc.blocking import Client
from netrpc.certs import PKI, Usage
from tests.daemon_process import TWISTD, DaemonProcess

pytestmark = pytest.mark.e2e

IS_ROOT = os.geteuid() == 0
# As root the daemon must switch to an unprivileged user; nobody exists on
# every Debian-like system.
UNPRIVILEGED_USER = "nobody"
LOOPBACK = "mtls:port=0:interface=127.0.0.1"


def privilege_arguments() -> list[str]:
    """Return the options that make the daemon drop root, when the tests run as root."""
    return ["--user", UNPRIVILEGED_USER] if IS_ROOT else []


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[object]:
    """Start daemons in ``tmp_path`` and stop every one of them after the test."""
    started: list[DaemonProcess] = []

    def start(arguments: Sequence[str], twistd_arguments: Sequence[str] = ()) -> DaemonProcess:
        daemon = DaemonProcess(arguments, tmp_path, twistd_arguments)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL, timeout=10)


def client_for(pki: PKI, port: int, name: str = "alice") -> Client:
    return Client(
        "localhost",
        port,
        cert=pki.client_cert(name),
        key=pki.client_key(name),
        ca=pki.server_ca_cert,
        timeout=10,
    )


def run_twistd(arguments: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to exit during start-up."""
    command = [TWISTD, "--nodaemon", "--pidfile=", "securerpc", *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("securerpc: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_call_and_sigterm(pki: PKI, start_daemon) -> None:
    """The daemon serves the demo over mutual TLS as an unprivileged user and exits 0 on SIGTERM."""
    daemon = start_daemon(["--pki", str(pki.directory), "--listen", LOOPBACK, *privilege_arguments()])
    port = daemon.wait_for_port()

    with client_for(pki, port) as client:
        assert client.call("multiply", 6, 7) == 42
        assert client.call("whoami")["common_name"] == "alice"
        assert client.call("system.health")["status"] == "serving"

    status_path = Path(f"/proc/{daemon.process.pid}/status")
    uid_line = next(line for line in status_path.read_text().splitlines() if line.startswith("Uid:"))
    real_uid = int(uid_line.split()[1])
    expected_uid = pwd.getpwnam(UNPRIVILEGED_USER).pw_uid if IS_ROOT else os.getuid()
    assert real_uid == expected_uid

    assert daemon.stop(signal.SIGTERM) == 0
    assert "Stopped" in daemon.output()


def test_start_log(pki: PKI, start_daemon) -> None:
    daemon = start_daemon(
        ["--pki", str(pki.directory), "--listen", LOOPBACK, "--instance", "blue", *privilege_arguments()]
    )
    daemon.wait_for_port()
    line = daemon.wait_for_line("securerpc blue started").string

    assert "client CA CN=" in line
    assert f"CRL {pki.crl}" in line
    assert "1 revoked" in line
    assert "methods exposed" in line
    assert "TLS 1.2 minimum" in daemon.output()


def test_sighup_reload(pki: PKI, start_daemon) -> None:
    """SIGHUP re-reads the TLS files without a restart; the process keeps serving."""
    daemon = start_daemon(["--pki", str(pki.directory), "--listen", LOOPBACK, *privilege_arguments()])
    port = daemon.wait_for_port()
    daemon.wait_for_line("started")

    daemon.process.send_signal(signal.SIGHUP)
    # As nobody the daemon cannot read the root-owned key again: it must
    # say so and keep serving on the old material.
    daemon.wait_for_line("Reloaded TLS material|Reload failed")

    with client_for(pki, port) as client:
        assert client.call("echo", "still here") == "still here"
    assert daemon.process.poll() is None


@pytest.mark.skipif(not IS_ROOT, reason="the root refusal needs a test run as root")
def test_root_refused(pki: PKI, tmp_path: Path) -> None:
    result = run_twistd(["--pki", str(pki.directory), "--listen", LOOPBACK], tmp_path)
    assert_one_line_error(result, "refusing to run RPC methods as root")


@pytest.mark.skipif(not IS_ROOT, reason="the root refusal needs a test run as root")
def test_root_refused_with_euid(pki: PKI, tmp_path: Path) -> None:
    """twistd's --euid keeps the real uid 0, which the daemon must refuse after the switch."""
    nobody = pwd.getpwnam(UNPRIVILEGED_USER)
    command = [
        TWISTD, "--nodaemon", "--pidfile=", "--euid", f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}",
        "securerpc", "--pki", str(pki.directory), "--listen", LOOPBACK,
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "switch to an unprivileged user did not happen")


def copy_pki(pki: PKI, destination: Path) -> PKI:
    shutil.copytree(pki.directory, destination)
    return PKI(destination)


def test_missing_pki(tmp_path: Path) -> None:
    result = run_twistd(["--pki", str(tmp_path / "absent"), *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "PKI folder")


def test_key_too_open(pki: PKI, tmp_path: Path) -> None:
    copy = copy_pki(pki, tmp_path / "pki")
    copy.server_key.chmod(0o640)
    result = run_twistd(["--pki", str(copy.directory), *privilege_arguments()], tmp_path)
    assert_one_line_error(result, f"run chmod 600 {copy.server_key}")


def test_key_not_matching(pki: PKI, other_pki: PKI, tmp_path: Path) -> None:
    copy = copy_pki(pki, tmp_path / "pki")
    copy.server_key.unlink()
    shutil.copy2(other_pki.server_key, copy.server_key)
    result = run_twistd(["--pki", str(copy.directory), *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "does not match")


def test_ca_certs_not_a_ca(pki: PKI, tmp_path: Path) -> None:
    endpoint = (
        f"{LOOPBACK}:privateKey={pki.server_key}:certKey={pki.server_cert}"
        f":caCerts={pki.client_cert('alice')}"
    )
    result = run_twistd(["--listen", endpoint, *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "not a CA")


def test_port_in_use(pki: PKI, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"mtls:port={port}:interface=127.0.0.1"
        result = run_twistd(["--pki", str(pki.directory), "--listen", listen, *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "address already in use")


def test_plain_tcp_rejected(tmp_path: Path) -> None:
    result = run_twistd(["--listen", "tcp:0", *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "is not an mtls: endpoint")


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "securerpc.toml"
    config.write_text("max_mesage_size = 10\n")
    result = run_twistd(["--config", str(config), *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "unknown key 'max_mesage_size'")


def test_help_lists_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWISTD, "securerpc", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in ("--listen", "--methods", "--config", "--pki", "--max-message-size"):
        assert option in result.stdout
    assert "[default: 1048576]" in " ".join(result.stdout.split())


def test_expired_server_certificate(pki: PKI, tmp_path: Path) -> None:
    copy = copy_pki(pki, tmp_path / "pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = copy.server_authority().issue(
        "localhost",
        usage=Usage.SERVER,
        names=["localhost"],
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    copy.server_cert.unlink()
    copy.server_key.unlink()
    expired.write(copy.server_cert, copy.server_key)

    result = run_twistd(["--pki", str(copy.directory), *privilege_arguments()], tmp_path)
    assert_one_line_error(result, "expired")


def encrypt_server_key(pki: PKI, destination: Path, passphrase: bytes) -> PKI:
    copy = copy_pki(pki, destination)
    issued = copy.server_authority().issue("localhost", usage=Usage.SERVER, names=["localhost"])
    copy.server_cert.unlink()
    copy.server_key.unlink()
    issued.write(copy.server_cert, copy.server_key, passphrase=passphrase)
    return copy


def test_passphrase_file(pki: PKI, tmp_path: Path, start_daemon) -> None:
    """An encrypted server key is unlocked once at start from --passphrase-file."""
    copy = encrypt_server_key(pki, tmp_path / "pki", b"correct horse")
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(b"correct horse\n")
    passphrase_file.chmod(0o600)

    daemon = start_daemon(
        ["--pki", str(copy.directory), "--passphrase-file", str(passphrase_file),
         "--listen", LOOPBACK, *privilege_arguments()]
    )
    port = daemon.wait_for_port()
    with client_for(copy, port) as client:
        assert client.call("multiply", 2, 21) == 42
    assert "correct horse" not in daemon.output()


def test_wrong_passphrase(pki: PKI, tmp_path: Path) -> None:
    copy = encrypt_server_key(pki, tmp_path / "pki", b"correct horse")
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(b"battery staple\n")
    passphrase_file.chmod(0o600)

    result = run_twistd(
        ["--pki", str(copy.directory), "--passphrase-file", str(passphrase_file), *privilege_arguments()],
        tmp_path,
    )
    assert_one_line_error(result, "wrong passphrase")
    assert "battery staple" not in result.stdout + result.stderr
