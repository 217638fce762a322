"""
Several processes serving one port: two daemons with ``reusePort=true``,
and ``--workers`` (``netrpc.workers``), whose parent binds the port once and
starts worker processes that adopt it. Each instance reports its name in
``system.health`` and enforces mutual TLS on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEventAsClassicLogText

from netrpc.certs import PKI
from netrpc.config import Settings
from netrpc.exceptions import ConfigurationError
from netrpc.workers import (
    WORKER_VARIABLE,
    NamedLogObserver,
    SharedSocket,
    build_pool,
    check_passphrase_source,
    is_worker,
    worker_environment,
    worker_name,
    worker_settings,
)
from tests.daemon_process import DaemonProcess
from tests.scaleout import (
    IS_ROOT,
    WAIT,
    client_context,
    instances_seen,
    one_call,
    privilege_arguments,
    start_daemon,
)

__all__ = ["start_daemon"]

LOOPBACK = "mtls:port=0:interface=127.0.0.1"
_STARTED_WORKER = re.compile(r"Started worker (?P<name>\S+) \(pid (?P<pid>\d+)\)")


def rejected_everywhere(daemons: list[DaemonProcess], port: int, pki: PKI, attempts: int = 40) -> int:
    """
    Connect without a client certificate until every daemon has logged a
    rejection, at most ``attempts`` times; return the number of daemons that did.
    """
    pattern = r"Rejected TLS handshake from 127\.0\.0\.1:\d+: no certificate"
    logged: set[int] = set()
    for _ in range(attempts):
        with pytest.raises(OSError):
            one_call(port, client_context(pki, None), "system.health")
        for index, daemon in enumerate(daemons):
            if index not in logged and re.search(pattern, daemon.output()):
                logged.add(index)
        if len(logged) == len(daemons):
            break
    return len(logged)


def worker_pids(pool: DaemonProcess, count: int) -> dict[str, int]:
    """Wait until the pool logged ``count`` worker starts; return the latest pid of each worker."""
    pool.wait_for_line(r"Started worker \S+-%d " % count)
    return {match["name"]: int(match["pid"]) for match in _STARTED_WORKER.finditer(pool.output())}


def wait_for_count(process: DaemonProcess, pattern: str, count: int, seconds: float = WAIT) -> int:
    """Wait until ``pattern`` matches ``count`` logged lines, at most ``seconds``; return the matches."""
    deadline = time.monotonic() + seconds
    while True:
        found = len(re.findall(pattern, process.output()))
        if found >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


class TestReusePort:
    def test_two_daemons_one_port(self, pki: PKI, start_daemon: Any) -> None:
        """Two daemons bound with reusePort=true both serve the port and both enforce mutual TLS."""
        first = start_daemon(["--pki", str(pki.directory), "--instance", "blue",
                              "--listen", f"{LOOPBACK}:reusePort=true"])
        port = first.wait_for_port()
        second = start_daemon(["--pki", str(pki.directory), "--instance", "green",
                               "--listen", f"mtls:port={port}:interface=127.0.0.1:reusePort=true"])
        assert second.wait_for_port() == port
        first.wait_for_line("securerpc blue started")
        second.wait_for_line("securerpc green started")

        seen = instances_seen(port, client_context(pki), {"blue", "green"})

        assert seen == {"blue", "green"}
        assert rejected_everywhere([first, second], port, pki) == 2

    def test_port_taken_without_option(self, pki: PKI, start_daemon: Any) -> None:
        """Without reusePort on both sides, the second daemon cannot bind the port."""
        first = start_daemon(["--pki", str(pki.directory), "--listen", f"{LOOPBACK}:reusePort=true"])
        port = first.wait_for_port()
        second = start_daemon(["--pki", str(pki.directory), "--listen", f"mtls:port={port}:interface=127.0.0.1"])

        assert second.wait_for_exit() == 1
        assert "address already in use" in second.output()


class TestWorkers:
    def test_workers_share_port(self, pki: PKI, start_daemon: Any) -> None:
        """--workers 2 starts two named workers that both serve the one port and enforce mutual TLS."""
        pool = start_daemon(["--pki", str(pki.directory), "--instance", "pool", "--workers", "2",
                             "--listen", LOOPBACK])
        port = pool.wait_for_port()
        pool.wait_for_line("securerpc pool-1 started")
        pool.wait_for_line("securerpc pool-2 started")

        seen = instances_seen(port, client_context(pki), {"pool-1", "pool-2"})
        reply, _ = one_call(port, client_context(pki), "whoami")

        assert seen == {"pool-1", "pool-2"}
        assert reply["result"]["common_name"] == "alice"
        assert "for 2 workers" in pool.output()
        with pytest.raises(OSError):
            one_call(port, client_context(pki, None), "whoami")

    def test_sigterm_drains_workers(self, pki: PKI, start_daemon: Any) -> None:
        """SIGTERM to the parent lets a call in flight finish, stops every worker and exits 0."""
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        port = pool.wait_for_port()
        pids = worker_pids(pool, 2)
        pool.wait_for_line("securerpc worker-1 started")
        pool.wait_for_line("securerpc worker-2 started")

        outcome: dict[str, Any] = {}

        def slow_call() -> None:
            outcome["reply"], _ = one_call(port, client_context(pki), "sleep", 1.0)

        caller = threading.Thread(target=slow_call)
        caller.start()
        # Long enough for the call to reach a worker, well before it ends.
        time.sleep(0.4)
        status = pool.stop(signal.SIGTERM)
        caller.join(timeout=WAIT)

        assert outcome["reply"]["result"] == 1.0
        assert status == 0
        assert pool.output().count("stopped, exit status 0") == 2
        assert not any(process_exists(pid) for pid in pids.values())

    def test_parent_killed_stops_workers(self, pki: PKI, start_daemon: Any) -> None:
        """Workers stop on their own when the parent dies without stopping them."""
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        pool.wait_for_port()
        pids = worker_pids(pool, 2)
        pool.wait_for_line("securerpc worker-1 started")
        pool.wait_for_line("securerpc worker-2 started")

        pool.stop(signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while any(process_exists(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)

        assert not any(process_exists(pid) for pid in pids.values())
        assert "The parent process ended; stopping worker worker-1" in pool.output()
        assert "The parent process ended; stopping worker worker-2" in pool.output()

    def test_worker_restarted(self, pki: PKI, start_daemon: Any) -> None:
        """A worker that dies is started again under the same name."""
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        port = pool.wait_for_port()
        old = worker_pids(pool, 2)
        pool.wait_for_line("securerpc worker-1 started")

        os.kill(old["worker-1"], signal.SIGKILL)
        pool.wait_for_line(r"Worker worker-1 \(pid \d+\) exited unexpectedly, exit status signal 9")
        pool.wait_for_line(r"Started worker worker-1 \(pid (?!%d\))\d+\)" % old["worker-1"])
        assert wait_for_count(pool, "securerpc worker-1 started", 2) == 2
        seen = instances_seen(port, client_context(pki), {"worker-1", "worker-2"})

        assert seen == {"worker-1", "worker-2"}

    def test_sighup_reaches_workers(self, pki: PKI, start_daemon: Any) -> None:
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        pool.wait_for_port()
        pool.wait_for_line("securerpc worker-1 started")
        pool.wait_for_line("securerpc worker-2 started")

        pool.process.send_signal(signal.SIGHUP)

        # As nobody, a worker cannot read the root-owned key again; it says
        # so and keeps serving, which still shows that it got the signal.
        assert wait_for_count(pool, r"Reloaded TLS material|Reload failed", 2) == 2
        outcomes = re.findall(r"\[(\S+) netrpc\.daemon#\w+\] (?:Reloaded TLS material|Reload failed)", pool.output())
        assert sorted(outcomes) == ["worker-1", "worker-2"]

    def test_sighup_during_start(self, pki: PKI, start_daemon: Any) -> None:
        """A SIGHUP while the workers start kills none of them, and each still reloads."""
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        pool.wait_for_line(r"Started worker \S+-2 ")

        # A worker takes a good part of a second to install its handler, so
        # some of these reach it before that.
        for _ in range(5):
            pool.process.send_signal(signal.SIGHUP)
            time.sleep(0.1)
        pool.wait_for_line("securerpc worker-1 started")
        pool.wait_for_line("securerpc worker-2 started")
        for name in ("worker-1", "worker-2"):
            pool.wait_for_line(rf"\[{name} netrpc\.daemon#\w+\] (?:Reloaded TLS material|Reload failed)")

        assert "exited unexpectedly" not in pool.output()

    def test_repeated_sigterm(self, pki: PKI, start_daemon: Any) -> None:
        """Several SIGTERMs to the parent while a call drains stop the pool once, with status 0."""
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK])
        port = pool.wait_for_port()
        pool.wait_for_line("securerpc worker-1 started")
        pool.wait_for_line("securerpc worker-2 started")
        outcome: dict[str, Any] = {}

        def slow_call() -> None:
            outcome["reply"], _ = one_call(port, client_context(pki), "sleep", 1.5)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.4)
        for _ in range(5):
            pool.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        status = pool.wait_for_exit()
        caller.join(timeout=WAIT)

        assert outcome["reply"]["result"] == 1.5
        assert status == 0
        assert "ReactorNotRunning" not in pool.output()
        assert len(re.findall(r"\[netrpc\.workers#\w+\] Received SIGTERM", pool.output())) == 1

    def test_twistd_uid_rejected(self, pki: PKI, tmp_path: Path) -> None:
        """twistd's --uid would switch the parent too, so --workers rejects it in one line."""
        arguments = ["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK]
        pool = DaemonProcess(arguments, tmp_path, twistd_arguments=["--uid", "nobody"])

        assert pool.wait_for_exit() == 1
        assert "Traceback" not in pool.output()
        assert "twistd's --uid and --gid cannot be combined with --workers" in pool.output()
        assert "--user" in pool.output()

    @pytest.mark.skipif(not IS_ROOT, reason="only a start as root needs a user")
    def test_root_without_user(self, pki: PKI, tmp_path: Path) -> None:
        arguments = ["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK]
        pool = DaemonProcess(arguments, tmp_path)

        assert pool.wait_for_exit() == 1
        assert "name an unprivileged user with --user" in pool.output()
        assert "--uid" not in pool.output()

    def test_sigterm_to_process_group(self, pki: PKI, tmp_path: Path) -> None:
        """SIGTERM to parent and workers at once, as systemd sends it, stops all without a traceback."""
        arguments = ["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK,
                     *privilege_arguments()]
        pool = DaemonProcess(arguments, tmp_path, new_session=True)
        try:
            port = pool.wait_for_port()
            pool.wait_for_line("securerpc worker-1 started")
            pool.wait_for_line("securerpc worker-2 started")
            # A worker that replied runs its reactor, so its own SIGTERM handler is in place.
            names = {"worker-1", "worker-2"}
            assert instances_seen(port, client_context(pki), names, attempts=200) == names
            os.killpg(pool.process.pid, signal.SIGTERM)
            status = pool.wait_for_exit(timeout=WAIT)
        finally:
            pool.stop(signal.SIGKILL, timeout=WAIT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pool.process.pid, signal.SIGKILL)

        assert status == 0
        assert "Traceback" not in pool.output()
        assert pool.output().count("stopped, exit status 0") == 2, pool.output()

    def test_services_imported_by_workers_only(self, pki: PKI) -> None:
        """The parent never imports a service; each worker does, as the service user."""
        directory = Path(tempfile.mkdtemp(prefix="netrpc-workers-"))
        try:
            # Readable by the service user, unlike pytest's own folders.
            directory.chmod(0o755)
            module = directory / "import_probe.py"
            module.write_text(
                "import os\n"
                "print(f'import_probe imported by uid {os.getuid()}', flush=True)\n"
                "def ping():\n    return 'pong'\n"
            )
            module.chmod(0o644)
            arguments = ["--pki", str(pki.directory), "--workers", "2", "--listen", LOOPBACK,
                         "--methods", "import_probe", *privilege_arguments()]
            pool = DaemonProcess(arguments, directory)
            try:
                port = pool.wait_for_port()
                pool.wait_for_line("securerpc worker-1 started")
                pool.wait_for_line("securerpc worker-2 started")
                reply, _ = one_call(port, client_context(pki), "ping")
            finally:
                pool.stop(signal.SIGTERM, timeout=WAIT)
        finally:
            shutil.rmtree(directory)

        imports = re.findall(r"import_probe imported by uid (\d+)", pool.output())
        service_uid = pwd.getpwnam("nobody").pw_uid if IS_ROOT else os.getuid()
        assert reply["result"] == "pong"
        assert imports == [str(service_uid)] * 2

    def test_invalid_count(self, pki: PKI, start_daemon: Any) -> None:
        pool = start_daemon(["--pki", str(pki.directory), "--workers", "0", "--listen", LOOPBACK])

        assert pool.wait_for_exit() == 1
        assert "invalid --workers 0" in pool.output()


class TestWorkerSettings:
    def test_outside_worker(self) -> None:
        settings = Settings(listen=("mtls:port=8700",), instance="blue")
        assert worker_settings(settings, {}) is settings
        assert not is_worker({})

    def test_assignment(self) -> None:
        environ = {WORKER_VARIABLE: json.dumps({"name": "blue-2", "listen": ["mtls:fd=5"]})}
        settings = worker_settings(Settings(listen=("mtls:port=8700",), user="nobody"), environ)

        assert settings.listen == ("mtls:fd=5",)
        assert settings.instance == "blue-2"
        assert settings.user == "nobody"
        assert is_worker(environ)

    def test_invalid_assignment(self) -> None:
        with pytest.raises(ConfigurationError, match=r"invalid NETRPC_WORKER='\[\]'"):
            worker_settings(Settings(), {WORKER_VARIABLE: "[]"})

    def test_environment(self) -> None:
        parent = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "1000", "LISTEN_FDS": "1"}
        environment = worker_environment(parent, "worker-1", ["mtls:fd=3"])

        assert environment["PATH"] == "/usr/bin"
        assert "NOTIFY_SOCKET" not in environment
        assert "WATCHDOG_USEC" not in environment
        assert "LISTEN_FDS" not in environment
        assert json.loads(environment[WORKER_VARIABLE]) == {"name": "worker-1", "listen": ["mtls:fd=3"]}


class TestSharedSocket:
    def test_worker_description(self, tmp_path: Path) -> None:
        """Socket options give way to fd=N; TLS options and proxyProtocol stay, quoted."""
        import socket

        options = {"port": "0", "interface": "127.0.0.1", "backlog": "9", "reusePort": "true",
                   "certKey": str(tmp_path / "a:b.crt"), "proxyProtocol": "true"}
        with socket.socket() as listener:
            shared = SharedSocket("mtls:...", options, listener)
            description = shared.worker_description()

            assert description == (
                f"mtls:certKey={tmp_path}/a\\:b.crt:proxyProtocol=true:fd={listener.fileno()}"
            )


class TestBuildPool:
    def test_encrypted_key_needs_file(self, pki: PKI, tmp_path: Path) -> None:
        """An encrypted key without a passphrase file is rejected, as workers cannot prompt."""
        from netrpc.certs import Usage

        issued = pki.server_authority().issue("localhost", usage=Usage.SERVER, names=["localhost"])
        key, cert = tmp_path / "server.key", tmp_path / "server.crt"
        issued.write(cert, key, passphrase=b"correct horse")
        options = {"privateKey": str(key), "certKey": str(cert)}

        with pytest.raises(ConfigurationError, match="cannot prompt for its passphrase"):
            check_passphrase_source(options, Settings())
        check_passphrase_source(options, Settings(passphrase_file=tmp_path / "passphrase"))
        check_passphrase_source({**options, "passphraseFile": "x"}, Settings())

    def test_count_bounds(self, pki: PKI) -> None:
        settings = Settings(listen=(LOOPBACK,), methods=("netrpc.demo",), pki=pki.directory)
        with pytest.raises(ConfigurationError, match="invalid --workers 0"):
            build_pool(settings, 0, arguments=[])
        with pytest.raises(ConfigurationError, match="invalid --workers 257"):
            build_pool(settings, 257, arguments=[])

    def test_metrics_rejected(self, pki: PKI) -> None:
        settings = Settings(listen=(LOOPBACK,), pki=pki.directory, metrics_listen="tcp:9100:interface=127.0.0.1")
        with pytest.raises(ConfigurationError, match="cannot be combined with --workers"):
            build_pool(settings, 2, arguments=[])


class TestWorkerLog:
    def test_name_in_front_of_namespace(self) -> None:
        events: list[dict[str, Any]] = []
        observer = NamedLogObserver("rpc-2", events.append)
        observer({"log_namespace": "netrpc.daemon", "log_level": LogLevel.error, "log_format": "x"})

        assert events[0]["log_system"] == "rpc-2 netrpc.daemon#error"
        assert formatEventAsClassicLogText(events[0]).split(" ", 1)[1] == "[rpc-2 netrpc.daemon#error] x\n"

    def test_system_kept(self) -> None:
        events: list[dict[str, Any]] = []
        NamedLogObserver("rpc-1", events.append)({"log_system": "-", "log_format": "y"})

        assert events[0]["log_system"] == "rpc-1 -"

    def test_worker_name(self) -> None:
        assert worker_name({WORKER_VARIABLE: json.dumps({"name": "rpc-3", "listen": []})}) == "rpc-3"
        assert worker_name({}) is None
        assert worker_name({WORKER_VARIABLE: "[]"}) is None


class TestTwistdSwitch:
    def test_uid_rejected(self, pki: PKI) -> None:
        settings = Settings(listen=(LOOPBACK,), pki=pki.directory, user="nobody")
        with pytest.raises(ConfigurationError, match="--uid and --gid cannot be combined with --workers"):
            build_pool(settings, 2, arguments=[], twistd_options={"uid": 65534, "gid": None})
        with pytest.raises(ConfigurationError, match="name the user with --user"):
            build_pool(settings, 2, arguments=[], twistd_options={"uid": None, "gid": 65534})
