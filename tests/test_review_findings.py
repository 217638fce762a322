"""
Regression tests for defects an adversarial review found: each states the
promised behaviour that once failed (name checks of the blocking client,
revocation without a CRL, root's group, service code run as root, reloads
after the switch to the service user, limit and config validation).
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netrpc.blocking import Client
from netrpc.certs import PKI
from netrpc.exceptions import TLSVerificationError
from tests.daemon_process import DaemonProcess
from tests.scripted_server import ScriptedServer, ServerConnection

UNPRIVILEGED_USER = "nobody"


def _privileges() -> list[str]:
    return ["--user", UNPRIVILEGED_USER] if os.geteuid() == 0 else []


def _odd_server_cert(
    pki: PKI, directory: Path, *, alt_names: bool, usage: bool
) -> tuple[Path, Path]:
    """Sign a server certificate for CN=localhost with the server CA, leaving out parts."""
    authority = pki.server_authority()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )

    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    if usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    certificate = builder.sign(authority.private_key, hashes.SHA256())

    cert_path, key_path = directory / "odd-server.crt", directory / "odd-server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _answer_echo(connection: ServerConnection) -> None:
    message = connection.read_message()
    if message is not None:
        connection.send_message({"jsonrpc": "2.0", "id": message["id"], "result": 7})


def _blocking_call_to(pki: PKI, cert: Path, key: Path) -> object:
    with ScriptedServer(_answer_echo, cert=cert, key=key) as server:
        with Client(
            "127.0.0.1",
            server.port,
            server_name="localhost",
            cert=pki.client_cert("alice"),
            key=pki.client_key("alice"),
            ca=pki.server_ca_cert,
            timeout=5,
        ) as client:
            return client.call("echo", 7)


def test_blocking_rejects_server_cert_without_alt_names(pki: PKI, tmp_path: Path) -> None:
    """A server certificate naming the host only in its CN fails as a name mismatch."""
    cert, key = _odd_server_cert(pki, tmp_path, alt_names=False, usage=True)
    with pytest.raises(TLSVerificationError):
        _blocking_call_to(pki, cert, key)


def test_blocking_rejects_server_cert_without_usage(pki: PKI, tmp_path: Path) -> None:
    """A server certificate without extendedKeyUsage fails as wrong key usage."""
    cert, key = _odd_server_cert(pki, tmp_path, alt_names=True, usage=False)
    with pytest.raises(TLSVerificationError):
        _blocking_call_to(pki, cert, key)


def _client(pki: PKI, name: str, port: int) -> Client:
    """Return a blocking client for ``name`` of ``pki``, calling the daemon on ``port``."""
    return Client(
        "127.0.0.1",
        port,
        server_name="localhost",
        cert=pki.client_cert(name),
        key=pki.client_key(name),
        ca=pki.server_ca_cert,
        timeout=5,
    )


def _start_daemon(arguments: list[str], cwd: Path) -> tuple[DaemonProcess, int | None]:
    """Start the daemon; return it and its port, or None when it exited instead."""
    daemon = DaemonProcess(
        ["--listen", "mtls:port=0:interface=127.0.0.1", *arguments], cwd=cwd
    )
    try:
        return daemon, daemon.wait_for_port(timeout=15)
    except AssertionError:
        daemon.stop()
        return daemon, None


def test_pki_without_crl_never_admits_revoked_client(pki: PKI, tmp_path: Path) -> None:
    """A --pki folder whose CRL went missing must not let a revoked client in."""
    copy = tmp_path / "pki"
    shutil.copytree(pki.directory, copy)
    (copy / "client-ca.crl").unlink()

    daemon, port = _start_daemon(["--pki", str(copy), *_privileges()], tmp_path)
    if port is None:
        return  # exiting at start is correct as well
    try:
        with _client(pki, "mallory", port) as client:
            with pytest.raises(TLSVerificationError):
                client.call("echo", 1)
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can switch to another group")
@pytest.mark.parametrize(
    "options",
    [(["--group", "root"], []), (["--group", "0"], []), ([], ["--uid", "nobody", "--gid", "0"])],
    ids=["group-root", "group-0", "twistd-gid-0"],
)
def test_daemon_refuses_root_group(
    pki: PKI, tmp_path: Path, options: tuple[list[str], list[str]]
) -> None:
    """Starting with the root group as the target group exits with an error."""
    securerpc_options, twistd_options = options
    user = ["--user", UNPRIVILEGED_USER] if securerpc_options else []
    daemon = DaemonProcess(
        [
            "--listen", "mtls:port=0:interface=127.0.0.1",
            "--pki", str(pki.directory),
            *user,
            *securerpc_options,
        ],
        cwd=tmp_path,
        twistd_arguments=twistd_options,
    )
    try:
        daemon.wait_for_port(timeout=15)
    except AssertionError:
        assert daemon.wait_for_exit() != 0
        return
    daemon.stop()
    raise AssertionError(f"the daemon served with gid 0:\n{daemon.output()}")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("call_timeout", float("nan")),
        ("idle_timeout", float("nan")),
        ("shutdown_grace", float("nan")),
        ("max_message_size", float("inf")),
        ("max_in_flight", 2.5),
    ],
    ids=["call-timeout-nan", "idle-timeout-nan", "grace-nan", "size-inf", "in-flight-2.5"],
)
def test_limit_rejects_value(key: str, value: float) -> None:
    """A limit that is not a finite positive number of the right kind is a ConfigurationError."""
    from netrpc.config import merge_settings
    from netrpc.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError):
        merge_settings({key: value}, {})


def test_config_file_not_utf8(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is a ConfigurationError naming the file."""
    from netrpc.config import read_config_file
    from netrpc.exceptions import ConfigurationError

    path = tmp_path / "latin1.toml"
    path.write_bytes(b'instance = "caf\xe9"\n')
    with pytest.raises(ConfigurationError, match="latin1.toml"):
        read_config_file(path)


def test_service_exiting_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service module that raises SystemExit while importing is a ConfigurationError."""
    from netrpc.exceptions import ConfigurationError
    from netrpc.methods import build_registry

    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigurationError):
        build_registry(["exits_on_import"])


_IMPORT_UID_SERVICE = '''\
import os

__all__ = ["import_uid"]
IMPORT_UID = os.geteuid()


def import_uid():
    return IMPORT_UID
'''


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder under /tmp that the unprivileged user may enter, unlike pytest's tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="netrpc-review-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege switch happens only as root")
def test_service_module_imported_unprivileged(
    pki: PKI, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Module-level code of a service runs only after the switch to the service user."""
    module = shared_tmp / "import_uid_service.py"
    module.write_text(_IMPORT_UID_SERVICE)
    module.chmod(0o644)

    monkeypatch.setenv("PYTHONPATH", str(shared_tmp))
    daemon, port = _start_daemon(
        ["--pki", str(pki.directory), "--methods", "import_uid_service", *_privileges()],
        shared_tmp,
    )
    assert port is not None, daemon.output()
    try:
        with _client(pki, "alice", port) as client:
            assert client.call("import_uid") != 0
    finally:
        daemon.stop()


def _shared_pki_copy(pki: PKI, folder: Path) -> PKI:
    """Copy ``pki`` so the service user can read all but the keys, as a server would keep it."""
    copy = PKI(folder / "pki")
    shutil.copytree(pki.directory, copy.directory)
    copy.directory.chmod(0o755)
    return copy


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege switch happens only as root")
def test_revocation_reload_as_root_with_user(pki: PKI, shared_tmp: Path) -> None:
    """After revoke and SIGHUP, a daemon started as root rejects the revoked client,
    although its root-only key cannot be read again."""
    copy = _shared_pki_copy(pki, shared_tmp)
    daemon, port = _start_daemon(["--pki", str(copy.directory), *_privileges()], shared_tmp)
    assert port is not None, daemon.output()
    try:
        copy.revoke_client("bob")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_line(r"Reload(ed| failed)")
        assert "Reload failed" not in daemon.output()

        with _client(copy, "bob", port) as client:
            with pytest.raises(TLSVerificationError):
                client.call("echo", 1)
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege switch happens only as root")
def test_unreadable_reload_files_warned(pki: PKI, tmp_path: Path) -> None:
    """A PKI folder the service user cannot enter makes the start log warn that reloads will fail."""
    daemon, port = _start_daemon(["--pki", str(pki.directory), *_privileges()], tmp_path)
    assert port is not None, daemon.output()
    try:
        line = daemon.wait_for_line("Reloads will fail").string
        assert str(pki.crl) in line
        assert str(pki.server_key) not in line
    finally:
        daemon.stop()


def test_unreadable_installation_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the switch to the service user, an installation it cannot read is logged."""
    from twisted.logger import LogEvent, globalLogPublisher

    from netrpc import server

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    monkeypatch.setattr(server.os, "access", lambda path, mode: False)
    try:
        server._warn_unreadable_installation()
    finally:
        globalLogPublisher.removeObserver(events.append)

    (event,) = [event for event in events if "own installation" in event.get("log_format", "")]
    assert str(Path(server.__file__).parent.parent) in event["folders"]
