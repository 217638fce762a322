"""
The shipped HAProxy configuration (``deploy/haproxy/haproxy.cfg``) in front
of two daemons on loopback: a real HAProxy from the Debian package, mutual
TLS passed through to the daemons, the PROXY v2 header, and health checks
made as a real JSON-RPC call over mutual TLS.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netrpc.certs import PKI
from tests.daemon_process import DaemonProcess
from tests.scaleout import (
    IS_ROOT,
    WAIT,
    client_context,
    free_port,
    instances_seen,
    one_call,
    start_daemon,
)

pytestmark = pytest.mark.e2e

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
HEALTH_CLIENT = "haproxy-health"

# The access policy that docs/scaling.md gives with the shipped
# configuration: the health-check certificate may call system.health only.
POLICY = """
[policy]
public_methods = []

[[policy.rule]]
identities = ["haproxy-health"]
methods = ["system.health"]

[[policy.rule]]
identities = ["alice"]
methods = ["*"]

[audit]
destination = "log"
"""

__all__ = ["start_daemon"]


def ensure_haproxy() -> str:
    """Return the path of ``haproxy``, installing the Debian package as root if it is missing."""
    found = shutil.which("haproxy")
    if found:
        return found
    if not IS_ROOT or not shutil.which("apt-get"):
        pytest.skip("haproxy is not installed; install the Debian package haproxy to run this test")

    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
        if result.returncode != 0:
            pytest.skip(f"cannot install haproxy: {' '.join(command)} failed: {result.stderr[-500:]}")
    return shutil.which("haproxy") or pytest.skip("haproxy is still missing after apt-get install")


@dataclass
class Cluster:
    """Two daemons behind a running HAProxy, and the files they use."""

    pki: PKI
    haproxy: subprocess.Popen[str]
    port: int
    stats_socket: Path
    log: Path
    daemons: dict[str, DaemonProcess]


def render_config(template: str, replacements: dict[str, str]) -> str:
    """Replace each key of ``replacements`` in ``template``, which must contain it once."""
    for old, new in replacements.items():
        assert template.count(old) == 1, f"{old!r} is not in the shipped config exactly once"
        template = template.replace(old, new)
    return template


def write_config(directory: Path, pki: PKI, ports: dict[str, int], port: int) -> tuple[Path, Path]:
    """Write the shipped config with this test's addresses and files; return it and its stats socket."""
    health_pem = directory / "health.pem"
    health_pem.write_bytes(
        pki.client_cert(HEALTH_CLIENT).read_bytes() + pki.client_key(HEALTH_CLIENT).read_bytes()
    )
    health_pem.chmod(0o600)
    stats_socket = directory / "admin.sock"
    replacements = {
        "bind 0.0.0.0:8700": f"bind 127.0.0.1:{port}",
        "server rpc1 192.0.2.11:8700": f"server rpc1 127.0.0.1:{ports['rpc1']}",
        "server rpc2 192.0.2.12:8700": f"server rpc2 127.0.0.1:{ports['rpc2']}",
        "/run/haproxy/netrpc-admin.sock": str(stats_socket),
        "/etc/haproxy/netrpc/health.pem": str(health_pem),
        "/etc/haproxy/netrpc/server-ca.crt": str(pki.server_ca_cert),
        "verifyhost rpc.example.com": "verifyhost localhost",
        # Faster checks keep the test short; the rest is the shipped file.
        "inter 2s": "inter 200ms",
    }
    if not IS_ROOT:
        # Only root can switch users.
        replacements.update({"    user haproxy\n": "", "    group haproxy\n": ""})

    config = directory / "haproxy.cfg"
    config.write_text(render_config(TEMPLATE.read_text(), replacements))
    return config, stats_socket


def server_states(stats_socket: Path) -> dict[str, dict[str, str]]:
    """Return HAProxy's ``show stat`` rows of the netrpc backend's servers, by server name."""
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(WAIT)
        admin.connect(str(stats_socket))
        admin.sendall(b"show stat\n")
        data = b""
        while chunk := admin.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {row["svname"]: row for row in rows if row["pxname"] == "netrpc" and row["svname"].startswith("rpc")}


def wait_for_states(stats_socket: Path, expected: dict[str, str], seconds: float = WAIT) -> dict[str, dict[str, str]]:
    """Poll ``show stat`` until each server named in ``expected`` has that status; return the rows."""
    deadline = time.monotonic() + seconds
    while True:
        states = server_states(stats_socket) if stats_socket.exists() else {}
        if all(states.get(name, {}).get("status") == status for name, status in expected.items()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"servers did not reach {expected} in {seconds} s: {states}")
        time.sleep(0.1)


@pytest.fixture
def cluster(pki: PKI, tmp_path: Path, start_daemon: Any) -> Iterator[Cluster]:
    """Start two daemons with the PROXY option and the shipped HAProxy config in front of them."""
    haproxy = ensure_haproxy()
    copy = PKI(shutil.copytree(pki.directory, tmp_path / "pki"))
    copy.issue_client(HEALTH_CLIENT)
    config_file = tmp_path / "securerpc.toml"
    config_file.write_text(POLICY)

    daemons: dict[str, DaemonProcess] = {}
    for name in ("rpc1", "rpc2"):
        daemons[name] = start_daemon(
            ["--config", str(config_file), "--pki", str(copy.directory), "--instance", name,
             "--listen", "mtls:port=0:interface=127.0.0.1:proxyProtocol=true"]
        )
    ports = {name: daemon.wait_for_port() for name, daemon in daemons.items()}

    port = free_port()
    config, stats_socket = write_config(tmp_path, copy, ports, port)
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    log = tmp_path / "haproxy.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"], stdout=output, stderr=subprocess.STDOUT, text=True
        )
    try:
        try:
            wait_for_states(stats_socket, {"rpc1": "UP", "rpc2": "UP"})
        except AssertionError as error:
            outputs = "\n".join(daemon.output() for daemon in daemons.values())
            raise AssertionError(f"{error}\nHAProxy:\n{log.read_text()}\nDaemons:\n{outputs}") from None
        yield Cluster(copy, process, port, stats_socket, log, daemons)
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=WAIT)


def logged_by_one(cluster: Cluster, pattern: str, seconds: float = WAIT) -> list[str]:
    """Wait until a daemon logs a line matching ``pattern``; return the matching lines of all daemons."""
    deadline = time.monotonic() + seconds
    while True:
        found = [
            line
            for daemon in cluster.daemons.values()
            for line in daemon.output().splitlines()
            if re.search(pattern, line)
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_call_through_proxy(cluster: Cluster) -> None:
    """A call through HAProxy reaches a daemon with the client's own certificate and address."""
    reply, own_address = one_call(cluster.port, client_context(cluster.pki), "whoami")

    identity = reply["result"]
    assert identity["common_name"] == "alice"
    assert identity["address"] == own_address
    audit = logged_by_one(cluster, rf"peer={re.escape(own_address)} .*method=whoami")
    assert len(audit) == 1
    assert "identity=alice" in audit[0]
    assert "outcome=ok" in audit[0]


def test_both_daemons_serve(cluster: Cluster) -> None:
    seen = instances_seen(cluster.port, client_context(cluster.pki), {"rpc1", "rpc2"})
    assert seen == {"rpc1", "rpc2"}


def test_client_without_certificate(cluster: Cluster) -> None:
    """The daemon, not HAProxy, rejects a client without a certificate, and logs its real address."""
    with pytest.raises(OSError) as caught:
        one_call(cluster.port, client_context(cluster.pki, None), "whoami")

    assert isinstance(caught.value, (ssl.SSLError, ConnectionResetError))
    rejected = logged_by_one(cluster, r"Rejected TLS handshake from 127\.0\.0\.1:\d+: no certificate")
    assert len(rejected) == 1


def test_rejected_client_address(cluster: Cluster, pki: PKI, other_pki: PKI) -> None:
    """The rejection log names the client's own port, which only the PROXY header carries."""
    context = client_context(other_pki)
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=WAIT) as raw:
        own_port = raw.getsockname()[1]
        with pytest.raises(OSError):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"2:{},")
                tls.recv(1)

    rejected = logged_by_one(cluster, rf"Rejected TLS handshake from 127\.0\.0\.1:{own_port}: unknown CA")
    assert len(rejected) == 1


def test_health_check_fails_for_stopped_daemon(cluster: Cluster) -> None:
    """Checks pass over mutual TLS; a stopped daemon goes DOWN and calls go to the other one."""
    states = server_states(cluster.stats_socket)
    assert states["rpc1"]["check_status"] == "L7OK"
    assert states["rpc2"]["check_status"] == "L7OK"

    assert cluster.daemons["rpc2"].stop(signal.SIGTERM) == 0
    states = wait_for_states(cluster.stats_socket, {"rpc1": "UP", "rpc2": "DOWN"})

    assert states["rpc2"]["check_status"] in ("L4CON", "L6RSP", "L7RSP", "L4TOUT", "L6TOUT")
    for _ in range(5):
        reply, _ = one_call(cluster.port, client_context(cluster.pki), "system.health")
        assert reply["result"]["instance"] == "rpc1"
    assert "rpc2 is DOWN" in cluster.log.read_text()


def test_health_certificate_only_health(cluster: Cluster) -> None:
    """The health-check certificate may call system.health and nothing else."""
    context = client_context(cluster.pki, HEALTH_CLIENT)

    health, _ = one_call(cluster.port, context, "system.health")
    forbidden, _ = one_call(cluster.port, context, "multiply", 6, 7)

    assert health["result"]["status"] == "serving"
    assert forbidden["error"]["code"] == -32003
