"""
Helpers for the scale-out tests: several ``twistd -n securerpc`` processes
on loopback, and one-shot JSON-RPC calls on a fresh connection each, so a
test knows the client's own address and which instance replied.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from netrpc.blocking import build_context
from netrpc.certs import PKI
from netrpc.framing import NetstringDecoder, encode
from tests.daemon_process import DaemonProcess

IS_ROOT = os.geteuid() == 0

# Upper bound for one call or one wait in these tests, in seconds.
WAIT = 10.0


def privilege_arguments() -> list[str]:
    """Return the options that make the daemon drop root, when the tests run as root."""
    return ["--user", "nobody"] if IS_ROOT else []


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Start daemons in ``tmp_path``; kill every one still running after the test."""
    started: list[DaemonProcess] = []

    def start(arguments: Sequence[str]) -> DaemonProcess:
        daemon = DaemonProcess([*arguments, *privilege_arguments()], tmp_path)
        started.append(daemon)
        return daemon

    yield start
    # SIGTERM first, so that a --workers parent stops its workers too.
    for daemon in started:
        daemon.stop(signal.SIGTERM, timeout=WAIT)


def client_context(pki: PKI, name: str | None = "alice") -> ssl.SSLContext:
    """Return a client TLS context for client ``name`` of ``pki``, or one without a certificate."""
    if name is None:
        context = ssl.create_default_context(cafile=str(pki.server_ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context
    return build_context(cert=pki.client_cert(name), key=pki.client_key(name), ca=pki.server_ca_cert)


def one_call(
    port: int, context: ssl.SSLContext, method: str, *params: Any
) -> tuple[dict[str, Any], str]:
    """
    Call ``method`` on a new connection to 127.0.0.1:``port`` and close it.

    Return the decoded reply object and this client's own address as
    ``host:port``. Raise ``OSError`` (``ssl.SSLError`` included) when the
    connection fails or closes before the reply.
    """
    request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        host, local_port = raw.getsockname()[:2]
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(encode(json.dumps(request).encode()))
            frame = _read_frame(tls)
    return json.loads(frame), f"{host}:{local_port}"


def _read_frame(tls: ssl.SSLSocket) -> bytes:
    decoder = NetstringDecoder(1024 * 1024)
    while True:
        data = tls.recv(65536)
        if not data:
            raise ConnectionResetError("the server closed the connection before its reply")
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def instances_seen(port: int, context: ssl.SSLContext, expected: set[str], attempts: int = 40) -> set[str]:
    """
    Call ``system.health`` on new connections until every instance name in
    ``expected`` has replied, at most ``attempts`` times; return the names seen.
    """
    seen: set[str] = set()
    for _ in range(attempts):
        reply, _ = one_call(port, context, "system.health")
        seen.add(reply["result"]["instance"])
        if expected <= seen:
            break
    return seen


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
