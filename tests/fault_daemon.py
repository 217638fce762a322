"""
Helpers for the hostile-input and load tests: a ``twistd securerpc`` child
process that serves ``fault_service`` next to the demo, raw TLS sockets
that speak netstrings by hand, and the daemon's memory as the kernel counts
it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from netrpc.certs import PKI
from netrpc.framing import FramingError, NetstringDecoder
from tests.daemon_process import DaemonProcess
from tests.service_user import service_python_path

SERVICES = ["--methods", "netrpc.demo", "--methods", "fault_service"]
# As root the daemon must switch to an unprivileged user; nobody exists on
# every Debian-like system.
PRIVILEGES = ["--user", "nobody"] if os.geteuid() == 0 else []


def start_daemon(
    pki: PKI, directory: Path, options: Sequence[str] = (), *, port: int = 0
) -> DaemonProcess:
    """Start ``twistd -n securerpc`` on loopback with the demo and ``fault_service``."""
    arguments = [
        "--pki",
        str(pki.directory),
        "--listen",
        f"mtls:port={port}:interface=127.0.0.1",
        *SERVICES,
        *PRIVILEGES,
        *options,
    ]
    # DaemonProcess copies os.environ into the environment of the child.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", service_python_path())
        return DaemonProcess(arguments, directory)


@contextmanager
def running_daemon(
    pki: PKI, directory: Path, options: Sequence[str] = ()
) -> Iterator[tuple[DaemonProcess, int]]:
    """Run a daemon for the ``with`` block and kill it afterwards if it still runs."""
    daemon = start_daemon(pki, directory, options)
    try:
        yield daemon, daemon.wait_for_port()
    finally:
        daemon.stop(signal.SIGKILL, timeout=10)


def client_description(pki: PKI, port: int, name: str = "alice") -> str:
    """Return the ``mtls:`` client endpoint of ``name`` for a daemon on ``port``."""
    return (
        f"mtls:host=127.0.0.1:port={port}:privateKey={pki.client_key(name)}"
        f":certKey={pki.client_cert(name)}:caCerts={pki.server_ca_cert}:serverName=localhost"
    )


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """Return a memory figure of process ``pid`` from /proc, in KiB (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise AssertionError(f"/proc/{pid}/status has no {field} line")


def reset_peak_memory(pid: int) -> None:
    """Set VmHWM of process ``pid`` back to its current VmRSS (Linux, needs the right to ptrace it)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def lines_about(daemon: DaemonProcess, port: int) -> list[str]:
    """Return the daemon's log lines that name the loopback peer with source port ``port``."""
    peer = re.compile(rf"127\.0\.0\.1:{port}(?!\d)")
    return [line for line in daemon.output().splitlines() if peer.search(line)]


class TLSDialer:
    """Open mutual-TLS connections with stdlib ``ssl``, to send any bytes by hand."""

    def __init__(self, pki: PKI, port: int, name: str = "alice") -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(pki.server_ca_cert))
        self.context.load_cert_chain(pki.client_cert(name), pki.client_key(name))

    def open(self, timeout: float = 10.0) -> ssl.SSLSocket:
        """Connect and finish the handshake; a clean close shows as ``recv`` returning b""."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        # Without ragged-EOF suppression, a close without close-notify
        # raises instead of looking like a clean end.
        return self.context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)

    def client_hello(self) -> bytes:
        """Return the first flight a TLS client sends: a complete ClientHello record."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        connection = self.context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            connection.do_handshake()
        return outgoing.read()


def read_until_closed(connection: socket.socket, limit: int = 10 * 1024 * 1024) -> tuple[bytes, str]:
    """
    Read until the peer closes, and return the bytes and how it closed:
    ``"clean"`` for a TLS close-notify or a TCP FIN, otherwise the error.
    """
    received = b""
    while len(received) < limit:
        try:
            data = connection.recv(65536)
        except (OSError, ssl.SSLError) as error:
            return received, type(error).__name__
        if not data:
            return received, "clean"
        received += data
    raise AssertionError(f"peer sent more than {limit} bytes without closing")


def netstring_payloads(data: bytes) -> list[bytes]:
    """Split received bytes into netstring payloads, failing the test on a framing error."""
    try:
        return NetstringDecoder(10**9).feed(data)
    except FramingError as error:
        raise AssertionError(f"the server sent an invalid netstring: {error}") from None


def send_frame(connection: socket.socket, payload: Any) -> None:
    """Send one netstring; ``payload`` is bytes or a ``str`` of JSON text."""
    data = payload if isinstance(payload, bytes) else payload.encode()
    connection.sendall(b"%d:%s," % (len(data), data))
