"""
Boot a real systemd in a container, install netrpc there by following
docs/install.md command by command, and drive the shipped units: the plain
service, socket activation on a port below 1024, and two instances on one
port.

Needs root and systemd-nspawn. The first run on a machine installs
systemd-container and debootstrap with apt and builds the container root,
which takes about a minute; later runs reuse it. See tests/systemd_lab.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from systemd_lab import (
    Container,
    GuideBlock,
    LabError,
    ensure_root,
    guide_section,
    read_guide,
    unavailable_reason,
)

pytestmark = pytest.mark.systemd

PROJECT = Path(__file__).resolve().parent.parent
GUIDE = PROJECT / "docs/install.md"

# The guide's sections that prepare the server, in order.
INSTALL_SECTIONS = (
    "Install the package",
    "Create the user and the folders",
    "Create the certificates",
    "Place the files",
    "Install the units",
)
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    "*.key",
)
# Where the guide runs its server commands, with wheels/ and systemd/ in it.
SERVER_FOLDER = "/root"
PKI = "/root/securerpc-pki"
CLIENT = "alice"
NO_CAPABILITIES = "0000000000000000"

# Bounds for waiting on the daemon inside the container.
WAIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.2
# SO_REUSEPORT spreads connections by a hash of their addresses, so a few
# calls may all land on one instance. With 40 calls that each pick one of
# two instances, the chance of missing one is 2 ** -39.
MAX_INSTANCE_CALLS = 40


@pytest.fixture(scope="module")
def guide() -> list[GuideBlock]:
    return read_guide(GUIDE)


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, guide: list[GuideBlock]
) -> Iterator[Container]:
    """A booted container with netrpc installed by the guide's steps, no unit started."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        root = ensure_root()
    except LabError as error:
        pytest.skip(f"cannot build the container root: {error}")

    stage = tmp_path_factory.mktemp("stage")
    _run_host_blocks(guide_section(guide, "Build the wheels"), stage)
    with Container(root, stage, stage / "console.log") as container:
        container.run("cp", "-r", "/mnt/stage/wheels", "/mnt/stage/systemd", SERVER_FOLDER)
        for section in INSTALL_SECTIONS:
            run_section(container, guide, section)
        yield container


def _run_host_blocks(blocks: list[GuideBlock], stage: Path) -> None:
    """
    Run the guide's build step on the host, in ``stage``, with a copy of
    the checkout at ``./netrpc`` and the test run's Python first on PATH.

    The copy keeps the build from writing into the checkout, and from
    packing stale modules that an old ``build/`` folder still holds.
    """
    shutil.copytree(PROJECT, stage / "netrpc", ignore=_NOT_SOURCE)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    for block in blocks:
        assert block.where == "host", block
        subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.script],
            cwd=stage,
            env={**os.environ, "PATH": path},
            check=True,
            capture_output=True,
            timeout=600,
        )


@pytest.fixture(autouse=True)
def units_stopped(lab: Container) -> None:
    """Start each test with no securerpc unit running, whatever the last one left."""
    lab.run("systemctl", "stop", "securerpc*")
    lab.run("systemctl", "reset-failed")


def run_section(container: Container, guide: list[GuideBlock], section: str) -> str:
    """Run the server blocks of one section of the guide; return their output."""
    output = []
    for block in guide_section(guide, section):
        assert block.where == "server", block
        result = container.run("bash", "-euo", "pipefail", "-c", block.script, cwd=SERVER_FOLDER)
        output.append(result.stdout)
    return "".join(output)


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def unit_property(container: Container, unit: str, name: str) -> str:
    return container.run("systemctl", "show", "--value", f"--property={name}", unit).stdout.strip()


def is_active(container: Container, unit: str) -> str:
    return container.run("systemctl", "is-active", unit, check=False).stdout.strip()


def main_pid(container: Container, unit: str) -> int:
    pid = int(unit_property(container, unit, "MainPID"))
    assert pid > 0, f"{unit} has no main process"
    return pid


def process_status(container: Container, pid: int) -> dict[str, str]:
    """Return the fields of /proc/PID/status inside the container."""
    text = container.run("cat", f"/proc/{pid}/status").stdout
    fields = (line.split(":", 1) for line in text.splitlines())
    return {name: value.strip() for name, value in fields}


def process_user(container: Container, pid: int) -> str:
    return container.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip()


def journal(container: Container, unit: str) -> str:
    return container.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


def daemon_log(container: Container, unit: str) -> str:
    """Return what the unit's current process has logged, without older runs."""
    invocation = unit_property(container, unit, "InvocationID")
    assert invocation, f"{unit} has not run"
    field = f"_SYSTEMD_INVOCATION_ID={invocation}"
    return container.run("journalctl", "--no-pager", "-o", "cat", field).stdout


def call(container: Container, port: int, *arguments: str) -> str:
    command = ["netrpc", "call", "--pki", PKI, "--name", CLIENT, "--server", f"localhost:{port}"]
    return container.run(*command, *arguments, cwd=SERVER_FOLDER).stdout


def assert_unprivileged(container: Container, pid: int) -> None:
    """The daemon runs as securerpc with no capability, no way to gain one,
    and a system call filter."""
    status = process_status(container, pid)
    assert process_user(container, pid) == "securerpc"
    assert status["CapEff"] == NO_CAPABILITIES
    assert status["CapPrm"] == NO_CAPABILITIES
    assert status["CapBnd"] == NO_CAPABILITIES
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def assert_reload_keeps_pid(container: Container, unit: str) -> None:
    pid = main_pid(container, unit)
    container.run("systemctl", "reload", unit)
    wait_for(
        f"the reload line in the journal of {unit}",
        lambda: re.search(r"Reloaded TLS material.* \(reload 1\)", daemon_log(container, unit))
        is not None,
    )
    assert main_pid(container, unit) == pid


def assert_clean_stop(container: Container, unit: str) -> None:
    container.run("systemctl", "stop", unit)
    assert is_active(container, unit) == "inactive"
    assert unit_property(container, unit, "Result") == "success"
    assert unit_property(container, unit, "ExecMainStatus") == "0"


def guide_file_modes() -> list[tuple[str, str, str]]:
    """
    Return (path, owner, mode) for each file of the guide's table, where
    owner is "user" or "user:group" and a path may end in a glob "*".
    """
    rows = []
    for line in GUIDE.read_text().splitlines():
        match = re.fullmatch(r"\| (`.+`) \| ([a-z]+(?::[a-z]+)?), (0\d{3}) \| .+ \|", line)
        if not match:
            continue
        names = re.findall(r"`([^`]+)`", match.group(1))
        folder = os.path.dirname(names[0])
        for name in names:
            rows.append((os.path.join(folder, name), match.group(2), match.group(3)))
    return rows


def test_file_modes(lab: Container) -> None:
    """Every file of the guide's table has the owner and mode the table gives."""
    rows = guide_file_modes()
    assert len(rows) >= 10
    for path, owner, mode in rows:
        found = lab.run("sh", "-c", f"stat -c '%n %U:%G 0%a' {path}", check=False).stdout
        if not found and path.endswith(".passphrase"):
            continue  # only for an encrypted key, which comes later
        assert found, path
        user, _, group = owner.partition(":")
        for entry in found.splitlines():
            name, actual_owner, actual_mode = entry.split()
            actual_user, _, actual_group = actual_owner.partition(":")
            assert (actual_user, actual_mode) == (user, mode), name
            if group:
                assert actual_group == group, name


def test_plain_service(lab: Container, guide: list[GuideBlock]) -> None:
    """securerpc.service starts, serves a call over mutual TLS, reloads and stops."""
    run_section(lab, guide, "Start the service")
    assert is_active(lab, "securerpc.service") == "active"
    assert unit_property(lab, "securerpc.service", "StatusText") == "Serving on 127.0.0.1:8700"
    assert_unprivileged(lab, main_pid(lab, "securerpc.service"))

    output = run_section(lab, guide, "Check the service")
    assert "42" in output.splitlines()

    assert_reload_keeps_pid(lab, "securerpc.service")
    assert_clean_stop(lab, "securerpc.service")

    lines = journal(lab, "securerpc.service")
    assert "[netrpc.daemon] Listening on 127.0.0.1 port 8700" in lines
    assert re.search(r"identity=alice .*method=multiply outcome=ok", lines)
    assert "[netrpc.daemon] Stopped" in lines


def test_encrypted_key(lab: Container, guide: list[GuideBlock]) -> None:
    """An encrypted server key is unlocked with the passphrase credential."""
    run_section(lab, guide, "An encrypted server key")
    assert "ENCRYPTED" in lab.run("head", "-n1", "/etc/securerpc/server.key").stdout
    passphrase = lab.run("stat", "-c", "%U:%G 0%a", "/etc/securerpc/server.key.passphrase")
    assert passphrase.stdout.split() == ["root:root", "0400"]

    assert is_active(lab, "securerpc.service") == "active"
    credentials = lab.run("ls", "/run/credentials/securerpc.service").stdout.split()
    assert sorted(credentials) == ["server.key", "server.key.passphrase"]
    assert "42" in call(lab, 8700, "multiply", "6", "7").splitlines()
    assert_reload_keeps_pid(lab, "securerpc.service")
    assert_clean_stop(lab, "securerpc.service")


def test_watchdog(lab: Container) -> None:
    """With WatchdogSec= set, the daemon keeps pinging and systemd keeps it running."""
    dropin = "/etc/systemd/system/securerpc.service.d/watchdog.conf"
    lab.run("mkdir", "-p", os.path.dirname(dropin))
    lab.run("sh", "-c", f"printf '[Service]\\nWatchdogSec=2s\\n' > {dropin}")
    lab.run("systemctl", "daemon-reload")
    lab.run("systemctl", "start", "securerpc.service")
    pid = main_pid(lab, "securerpc.service")

    pings: set[int] = set()

    def three_pings() -> bool:
        last = unit_property(lab, "securerpc.service", "WatchdogTimestampMonotonic")
        pings.add(int(last))
        return len(pings - {0}) >= 3

    wait_for("three watchdog pings", three_pings)
    assert main_pid(lab, "securerpc.service") == pid
    assert_clean_stop(lab, "securerpc.service")
    lab.run("rm", dropin)
    lab.run("systemctl", "daemon-reload")


def test_journal_priorities(lab: Container) -> None:
    """Log lines reach the journal with their priority and no second timestamp."""
    lab.run("systemctl", "start", "securerpc.service")
    output = lab.run(
        "journalctl", "--no-pager", "-o", "json", "-u", "securerpc.service"
    ).stdout
    entries = [json.loads(line) for line in output.splitlines()]
    listening = [e for e in entries if "Listening on" in str(e.get("MESSAGE", ""))]
    assert listening, "no 'Listening on' line in the journal"
    assert listening[0]["MESSAGE"].startswith("[netrpc.daemon] Listening on")
    assert listening[0]["PRIORITY"] == "6"


def test_socket_activation(lab: Container, guide: list[GuideBlock]) -> None:
    """securerpc.socket serves port 700 to a daemon without capabilities or network."""
    output = run_section(lab, guide, "Socket activation on a port below 1024")
    assert "42" in output.splitlines()

    assert is_active(lab, "securerpc.socket") == "active"
    assert is_active(lab, "securerpc-socket.service") == "active"
    pid = main_pid(lab, "securerpc-socket.service")
    assert_unprivileged(lab, pid)
    assert _network_namespace(lab, pid) != _network_namespace(lab, 1)
    links = lab.run("nsenter", f"--target={pid}", "--net", "ip", "-o", "link").stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    listeners = lab.run("ss", "-Hltnp", "sport = :700").stdout
    assert '"systemd",pid=1' in listeners

    assert_reload_keeps_pid(lab, "securerpc-socket.service")
    assert_clean_stop(lab, "securerpc-socket.service")
    assert is_active(lab, "securerpc.socket") == "active"

    lines = journal(lab, "securerpc-socket.service")
    assert "securerpc started" in lines
    assert re.search(r"identity=alice .*method=multiply outcome=ok", lines)
    assert "[netrpc.daemon] Stopped" in lines

    # The socket outlives the service and starts it again.
    assert "42" in call(lab, 700, "multiply", "6", "7").splitlines()
    assert main_pid(lab, "securerpc-socket.service") != pid


def _network_namespace(container: Container, pid: int) -> str:
    return container.run("readlink", f"/proc/{pid}/ns/net").stdout.strip()


def test_instances(lab: Container, guide: list[GuideBlock]) -> None:
    """securerpc@1.socket and securerpc@2.socket serve one port, each call
    reporting the instance that took it."""
    output = run_section(lab, guide, "Several instances on one port")
    seen = set(re.findall(r'"instance": "(\d)"', output))

    for _ in range(MAX_INSTANCE_CALLS):
        if seen == {"1", "2"}:
            break
        seen.update(re.findall(r'"instance": "(\d)"', call(lab, 700, "system.health")))
    assert seen == {"1", "2"}

    first = main_pid(lab, "securerpc@1.service")
    second = main_pid(lab, "securerpc@2.service")
    assert first != second
    assert_unprivileged(lab, first)
    assert_unprivileged(lab, second)
    assert "securerpc 1 started" in journal(lab, "securerpc@1.service")
    assert "securerpc 2 started" in journal(lab, "securerpc@2.service")


def test_removal(lab: Container, guide: list[GuideBlock]) -> None:
    """The guide's removal steps leave no unit behind and none failed."""
    run_section(lab, guide, "Removing the service")

    units = lab.run("systemctl", "list-units", "--all", "--no-legend", "securerpc*").stdout
    assert units.strip() == ""
    files = lab.run("systemctl", "list-unit-files", "--no-legend", "securerpc*", check=False)
    assert files.stdout.strip() == ""
    failed = lab.run("systemctl", "--failed", "--no-legend").stdout
    assert failed.strip() == ""
