"""
HAProxy in front of netrpc daemons, for the rows that compare calls made
through the proxy with calls made directly.

The configuration is the shipped ``deploy/haproxy/haproxy.cfg`` with this
run's loopback ports, certificate files and stats socket put in, and one
``server`` line per daemon. Everything else stays as shipped: TCP mode
with TLS passed through, ``leastconn``, ``send-proxy-v2`` and health
checks made as a JSON-RPC call over mutual TLS every 2 s. HAProxy runs in
the foreground as one process (with its default threads) and is stopped
by its process id.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from netrpc.certs import PKI

from bench.pki import BenchPKI
from bench.procs import ROOT, STOP_TIMEOUT, ProcessFailed

TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

# The client certificate that HAProxy presents on its health checks only.
HEALTH_CLIENT = "haproxy-health"

# The backend of the shipped file, and its two example server lines.
BACKEND = "netrpc"
SHIPPED_SERVERS = "    server rpc1 192.0.2.11:8700\n    server rpc2 192.0.2.12:8700\n"

# Seconds for every daemon to pass its first health check. The shipped
# file checks every 2 s and spreads the first checks over that interval.
CHECK_TIMEOUT = 30.0

# HAProxy cannot report a port it chose itself, so the bench picks a free
# one and tries again with another if HAProxy fails to start.
START_ATTEMPTS = 3

# Seconds that apt-get may take for each of its two steps.
INSTALL_TIMEOUT = 600.0

# Debian installs haproxy in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def executable() -> str | None:
    """Return the path of ``haproxy``, or None when it is not installed."""
    return shutil.which("haproxy", path=SEARCH_PATH)


@functools.cache
def missing() -> str | None:
    """
    Return why HAProxy cannot run here, or None when ``haproxy`` is installed.

    As root on a system with apt-get, a missing haproxy is installed from
    the Debian package first, once per run.
    """
    if executable():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "skipped: haproxy is not installed (install the Debian package haproxy)"

    failure = _install()
    if failure is not None:
        return f"skipped: haproxy is not installed, and {failure}"
    if not executable():
        return "skipped: haproxy is still not found after apt-get install haproxy"
    return None


def _install() -> str | None:
    """Install the Debian package haproxy. Return what failed, or None on success."""
    # NOTE: on a system running systemd, the package's own haproxy service
    # may start after the install. The bench neither uses nor stops it.
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=environment
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} timed out after {INSTALL_TIMEOUT:g} s"
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or ["no error output"])[-1]
            return f"{' '.join(command)} failed: {last_line}"
    return None


@functools.cache
def version() -> str:
    """Return HAProxy's version as ``haproxy -v`` prints it, such as "HAProxy version 2.6.12-1+deb12u4 2026/10/17"."""
    path = executable()
    if path is None:
        return "HAProxy not installed"
    output = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=30).stdout
    first_line = (output.splitlines() or ["HAProxy, version unknown"])[0]
    # The line ends with " - https://haproxy.org/".
    return first_line.split(" - ")[0]


def render_config(template: str, replacements: dict[str, str]) -> str:
    """Replace each key of ``replacements`` in ``template``, which must contain each key once."""
    for old, new in replacements.items():
        if template.count(old) != 1:
            raise ProcessFailed(
                f"{TEMPLATE} does not contain {old!r} exactly once. "
                "Update the replacements in bench/haproxy.py to match the shipped file."
            )
        template = template.replace(old, new)
    return template


def health_pem(directory: Path, pki: BenchPKI) -> Path:
    """Write the health-check certificate and its key as one PEM file, issuing the certificate first if needed."""
    certificates = PKI(pki.directory)
    if not certificates.client_cert(HEALTH_CLIENT).exists():
        certificates.issue_client(HEALTH_CLIENT)
    pem = directory / "health.pem"
    pem.write_bytes(
        certificates.client_cert(HEALTH_CLIENT).read_bytes() + certificates.client_key(HEALTH_CLIENT).read_bytes()
    )
    pem.chmod(0o600)
    return pem


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HAProxyProcess:
    """One HAProxy in front of daemons that expect a PROXY header, with its stats socket."""

    def __init__(self, config: Path, port: int, servers: Sequence[str]) -> None:
        self.config = config
        self.port = port
        self.servers = tuple(servers)
        self.stats_socket = config.with_name("admin.sock")
        self.log = config.with_name("haproxy.log")
        path = executable()
        if path is None:
            raise ProcessFailed("haproxy is not installed")

        checked = subprocess.run([path, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise ProcessFailed(f"haproxy -c rejected {config}:\n{(checked.stdout + checked.stderr).strip()}")
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [path, "-f", str(config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid

    def server_stats(self) -> dict[str, dict[str, str]]:
        """Return the ``show stat`` rows of this proxy's servers, by server name."""
        try:
            with socket.socket(socket.AF_UNIX) as admin:
                admin.settimeout(5.0)
                admin.connect(str(self.stats_socket))
                admin.sendall(b"show stat\n")
                chunks = []
                while chunk := admin.recv(65536):
                    chunks.append(chunk)
        except OSError as error:
            raise ProcessFailed(f"cannot read HAProxy's stats socket {self.stats_socket}: {error}") from error
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == BACKEND and row["svname"] in self.servers}

    def connections(self) -> dict[str, int]:
        """Return the number of client connections each server has received so far (``stot``)."""
        return {name: int(row["stot"]) for name, row in self.server_stats().items()}

    def wait_until_checked(self) -> None:
        """Wait until every server has passed a health check, or raise ``ProcessFailed``."""
        deadline = time.monotonic() + CHECK_TIMEOUT
        states: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProcessFailed(f"haproxy exited with status {self.process.returncode}\n{self.log_tail()}")
            if self.stats_socket.exists():
                states = self.server_stats()
                if len(states) == len(self.servers) and all(
                    row["status"] == "UP" and row["check_status"] == "L7OK" for row in states.values()
                ):
                    return
            time.sleep(0.1)
        summary = {name: (row["status"], row["check_status"]) for name, row in states.items()}
        raise ProcessFailed(f"health checks did not pass in {CHECK_TIMEOUT:g} s: {summary}\n{self.log_tail()}")

    def log_tail(self) -> str:
        """Return the last lines of HAProxy's output, for the error messages that follow the first line."""
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return "HAProxy's output:\n" + ("\n".join(lines[-5:]) or "(none)")

    def stop(self) -> None:
        """Send SIGTERM, wait, and kill HAProxy if it outlives ``STOP_TIMEOUT``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start(directory: Path, pki: BenchPKI, backend_ports: Sequence[int]) -> HAProxyProcess:
    """
    Start HAProxy on 127.0.0.1 in front of the daemons on ``backend_ports``
    and wait until each has passed a health check.

    Raises ``ProcessFailed`` when HAProxy cannot start or a check fails.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pem = health_pem(directory, pki)
    servers = [f"rpc{number}" for number in range(1, len(backend_ports) + 1)]
    server_lines = "".join(f"    server {name} 127.0.0.1:{port}\n" for name, port in zip(servers, backend_ports))

    failure = ""
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        replacements = {
            "bind 0.0.0.0:8700": f"bind 127.0.0.1:{port}",
            SHIPPED_SERVERS: server_lines,
            "/run/haproxy/netrpc-admin.sock": str(directory / "admin.sock"),
            "/etc/haproxy/netrpc/health.pem": str(pem),
            "/etc/haproxy/netrpc/server-ca.crt": str(pki.server_ca),
            "verifyhost rpc.example.com": "verifyhost localhost",
        }
        if os.geteuid() != 0:
            # Only root can switch users.
            replacements.update({"    user haproxy\n": "", "    group haproxy\n": ""})
        config = directory / "haproxy.cfg"
        config.write_text(render_config(TEMPLATE.read_text(), replacements))

        proxy = HAProxyProcess(config, port, servers)
        try:
            proxy.wait_until_checked()
            return proxy
        except ProcessFailed as error:
            exited = proxy.process.poll() is not None
            proxy.stop()
            if not exited:
                raise
            # Most likely another process took the port between the probe and HAProxy's bind.
            failure = str(error)
    raise ProcessFailed(f"haproxy did not start in {START_ATTEMPTS} attempts, the last one: {failure}")
