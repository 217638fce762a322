"""
Load and overload against a real ``twistd securerpc`` process: many
pipelined connections, half-open handshakes, a reader that never reads,
and a restart and a SIGTERM in the middle of the load.

``NETRPC_LOAD_SCALE`` multiplies the number of connections and of calls per
connection of the load test (default 1: 50 connections of 2,000 calls).
"""

from __future__ import annotations

import json
import math
import os
import resource
import selectors
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from netrpc import jsonrpc
from netrpc.blocking import Client as BlockingClient
from netrpc.certs import PKI
from netrpc.client import Backoff, Client, connect
from netrpc.exceptions import CallTimeout, ConnectionFailed, OutcomeUnknown, RemoteError
from netrpc.protocol import CLOSE_TIMEOUT
from tests.daemon_process import DaemonProcess
from tests.fault_daemon import (
    TLSDialer,
    client_description,
    memory_kib,
    netstring_payloads,
    read_until_closed,
    reset_peak_memory,
    running_daemon,
    send_frame,
    start_daemon,
)

pytestmark = pytest.mark.e2e

LOAD_SCALE = float(os.environ.get("NETRPC_LOAD_SCALE", "1"))
LOAD_CONNECTIONS = max(1, math.ceil(50 * LOAD_SCALE))
LOAD_CALLS = max(1, math.ceil(2000 * LOAD_SCALE))
LOAD_IN_FLIGHT = 32
# Every call is made at once and waits for a free place in flight, so its
# deadline grows with the total number of calls.
LOAD_CALL_TIMEOUT = 120 * max(1.0, LOAD_SCALE) ** 2
# The daemon's resident memory after the load may exceed its resident
# memory before it by this much; docs/limits.md gives the measurements.
LOAD_MEMORY_BOUND_KIB = 8 * 1024

FAST_BACKOFF = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
# Extra seconds allowed past a deadline for the reactor to run the timer.
DEADLINE_SLACK = 1.0


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def connect_client(pki: PKI, port: int, **options: Any) -> Client:
    return await connect(reactor, client_description(pki, port), backoff=FAST_BACKOFF, **options)


async def close_all(clients: list[Client]) -> None:
    await gatherResults([client.close() for client in clients])


def pid_of(daemon: DaemonProcess) -> int:
    return daemon.process.pid


# --- Load ---------------------------------------------------------------------


def run_pipelined(client: Client, number: int) -> Deferred[list[Any]]:
    """Make ``LOAD_CALLS`` calls at once; the client keeps ``LOAD_IN_FLIGHT`` of them in flight."""
    calls = [client.call("echo", [number, index]) for index in range(LOAD_CALLS)]
    return gatherResults(calls, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_load_many_connections(pki: PKI, tmp_path: Path) -> None:
    """Every pipelined call gets exactly its own result, and the daemon's memory returns near its start."""
    daemon = start_daemon(pki, tmp_path)
    try:
        port = await deferToThread(daemon.wait_for_port)
        clients = [
            await connect_client(pki, port, max_in_flight=LOAD_IN_FLIGHT, timeout=LOAD_CALL_TIMEOUT)
            for _ in range(LOAD_CONNECTIONS)
        ]
        assert await clients[0].call("echo", "warm") == "warm"
        start = memory_kib(pid_of(daemon))

        results = await gatherResults(
            [run_pipelined(client, number) for number, client in enumerate(clients)],
            consumeErrors=True,
        )
        await close_all(clients)
        # Let the daemon see every close before its memory is read.
        await sleep(0.5)
        end = memory_kib(pid_of(daemon))
    finally:
        await deferToThread(daemon.stop, signal.SIGKILL, 10)

    for number, replies in enumerate(results):
        assert replies == [[number, index] for index in range(LOAD_CALLS)]
    for client in clients:
        assert client.stats.unmatched_replies == 0
        assert client.stats.late_replies == 0
        assert client.stats.connections == 1
    assert end - start <= LOAD_MEMORY_BOUND_KIB, f"resident memory grew from {start} to {end} KiB"


# --- Handshakes that never finish -----------------------------------------------------

SLOW_CONNECTIONS = 500
HANDSHAKE_TIMEOUT = 4.0
# Connections opened between short pauses. The daemon's listen backlog (50
# by default) drops the SYNs of a faster burst, and the kernel then retries
# them only after a second.
OPEN_BURST = 20


def raise_file_limit(needed: int) -> None:
    """Raise this process's soft limit of open files to ``needed``, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_half_handshakes(port: int, partial_hello: bytes) -> list[tuple[socket.socket, float]]:
    """Open ``SLOW_CONNECTIONS`` connections: half send nothing, half a partial ClientHello."""
    opened = []
    for index in range(SLOW_CONNECTIONS):
        if index % OPEN_BURST == 0:
            time.sleep(0.02)
        started = time.monotonic()
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        if index % 2:
            connection.sendall(partial_hello)
        opened.append((connection, started))
    return opened


def wait_until_all_closed(opened: list[tuple[socket.socket, float]], deadline: float) -> list[float]:
    """Return how many seconds after its opening the server closed each connection."""
    lifetimes = []
    with selectors.DefaultSelector() as selector:
        for connection, started in opened:
            selector.register(connection, selectors.EVENT_READ, started)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    lifetimes.append(time.monotonic() - key.data)
                    selector.unregister(key.fileobj)
    return lifetimes


def test_slow_handshakes(pki: PKI, tmp_path: Path) -> None:
    """Connections that never finish their handshake neither block a real client nor outlive the timeout."""
    raise_file_limit(SLOW_CONNECTIONS + 256)
    options = ["--handshake-timeout", str(HANDSHAKE_TIMEOUT)]
    with running_daemon(pki, tmp_path, options) as (daemon, port):
        partial_hello = TLSDialer(pki, port).client_hello()[:40]
        opened = open_half_handshakes(port, partial_hello)
        try:
            with blocking_client(pki, port) as client:
                assert client.call("multiply", 6, 7) == 42
                # The client is served while every attacker still has its
                # socket open, since none can be closed before its timeout.
                still_open = [c for c, _ in opened if not readable(c)]
                assert len(still_open) == SLOW_CONNECTIONS
            lifetimes = wait_until_all_closed(opened, time.monotonic() + HANDSHAKE_TIMEOUT + 20)
        finally:
            for connection, _ in opened:
                connection.close()
        with blocking_client(pki, port) as client:
            stats = client.call("system.stats")

        assert len(lifetimes) == SLOW_CONNECTIONS
        assert min(lifetimes) >= HANDSHAKE_TIMEOUT
        assert stats["handshakes"]["failed"] == {"handshake timed out": SLOW_CONNECTIONS}
        line = daemon.wait_for_line("handshake timed out").string
        assert f"no complete handshake within {HANDSHAKE_TIMEOUT:g} s" in line


def blocking_client(pki: PKI, port: int) -> BlockingClient:
    return BlockingClient(
        "127.0.0.1",
        port,
        cert=pki.client_cert("alice"),
        key=pki.client_key("alice"),
        ca=pki.server_ca_cert,
        server_name="localhost",
        timeout=10,
    )


def readable(connection: socket.socket) -> bool:
    """Whether ``connection`` has data or a close waiting to be read."""
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        return bool(selector.select(timeout=0))


def test_connection_maximum(pki: PKI, tmp_path: Path) -> None:
    """Connections beyond the maximum are closed at once and counted; the others keep working."""
    with running_daemon(pki, tmp_path, ["--max-connections", "2"]) as (daemon, port):
        dialer = TLSDialer(pki, port)
        with dialer.open() as first, dialer.open() as second:
            # A reply on each proves the server finished both handshakes, so
            # neither can give way to the extra connection as a pending one.
            for connection in (first, second):
                send_frame(connection, '{"jsonrpc":"2.0","method":"system.health","id":0}')
                netstring_payloads(connection.recv(65536))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                received, _ = read_until_closed(extra)
            send_frame(first, '{"jsonrpc":"2.0","method":"system.stats","id":1}')
            (payload,) = netstring_payloads(first.recv(65536))

    assert received == b""
    assert json.loads(payload)["result"]["connections"]["refused_at_max"] == 1
    assert "2 connections open, the configured maximum" in daemon.output()


# --- A reader that never reads -----------------------------------------------------

MAX_UNSENT_BYTES = 1024 * 1024
BLOB_BYTES = 1024 * 1024
BLOB_CALLS = 64
# Peak resident memory may grow this much while the slow reader is served:
# a few replies in the making and the bounded unsent bytes. Keeping every
# reply would take more than BLOB_CALLS * BLOB_BYTES (64 MiB).
SLOW_READER_MEMORY_BOUND_KIB = 16 * 1024


def open_slow_reader(pki: PKI, port: int) -> ssl.SSLSocket:
    """Open a TLS connection with a tiny receive buffer, so the kernel buffers few replies."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    context = TLSDialer(pki, port).context
    return context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def test_slow_reader_disconnected(pki: PKI, tmp_path: Path) -> None:
    """A client that never reads its replies is cut off once the unsent bytes pass the limit."""
    options = ["--max-unsent-bytes", str(MAX_UNSENT_BYTES)]
    with running_daemon(pki, tmp_path, options) as (daemon, port):
        pid = pid_of(daemon)
        with TLSDialer(pki, port).open() as warm_up:
            send_frame(warm_up, '{"jsonrpc":"2.0","method":"blob","params":[1048576],"id":0}')
            read_until_closed_after(warm_up, BLOB_BYTES)
        start = memory_kib(pid)
        reset_peak_memory(pid)

        with open_slow_reader(pki, port) as reader:
            source_port = reader.getsockname()[1]
            for index in range(BLOB_CALLS):
                request = jsonrpc.build_request("late_blob", [0.2, BLOB_BYTES], index)
                send_frame(reader, jsonrpc.encode_message(request))
            line = daemon.wait_for_line(rf"Disconnecting 127\.0\.0\.1:{source_port}(?!\d)").string
            peak = memory_kib(pid, "VmHWM")
            received, closed = read_until_closed(reader, limit=BLOB_CALLS * BLOB_BYTES * 2)

        assert f"more than {MAX_UNSENT_BYTES} bytes of replies unread" in line
        assert closed != "clean"
        assert len(received) < BLOB_CALLS * BLOB_BYTES
        assert peak - start <= SLOW_READER_MEMORY_BOUND_KIB, f"peak memory grew from {start} to {peak} KiB"
        assert daemon.process.poll() is None


def read_until_closed_after(connection: ssl.SSLSocket, size: int) -> None:
    """Read at least ``size`` bytes of replies, then close."""
    received = 0
    while received < size:
        data = connection.recv(65536)
        assert data, "the daemon closed the warm-up connection"
        received += len(data)


# --- Restart and SIGTERM during load ----------------------------------------------

CALL_DEADLINE = 10.0
SHUTDOWN_GRACE = 2.0

# What a caller may see when the server goes away under it. Each error
# states that the call failed and why.
CLEAR_ERRORS = (RemoteError, OutcomeUnknown, ConnectionFailed, CallTimeout)


@dataclass
class CallRecord:
    """One call of a load driver: what it sent, when, and every outcome it got."""

    expected: Any
    sent: float
    outcomes: list[tuple[float, Any]] = field(default_factory=list)


class LoadDriver:
    """
    Keeps ``LOAD_IN_FLIGHT`` echo calls going on one client until stopped,
    or until a call fails because the client has no connection to send it on.
    """

    def __init__(self, client: Client, number: int, *, wait_for_connection: bool) -> None:
        self.client = client
        self.number = number
        self.wait_for_connection = wait_for_connection
        self.records: list[CallRecord] = []
        self.running = False
        self._outstanding: list[Deferred[Any]] = []

    def start(self) -> None:
        self.running = True
        for _ in range(LOAD_IN_FLIGHT):
            self._next()

    def stop(self) -> Deferred[Any]:
        """Make no more calls; fire once every call made has its outcome."""
        self.running = False
        return DeferredList(list(self._outstanding), consumeErrors=True)

    def _next(self) -> None:
        if not self.running:
            return
        value = [self.number, len(self.records)]
        record = CallRecord(value, time.monotonic())
        self.records.append(record)
        deferred = self.client.call(
            "echo", value, timeout=CALL_DEADLINE, wait_for_connection=self.wait_for_connection
        )
        self._outstanding.append(deferred)
        deferred.addBoth(self._done, record, deferred)

    def _done(self, outcome: Any, record: CallRecord, deferred: Deferred[Any]) -> None:
        value = getattr(outcome, "value", outcome)
        record.outcomes.append((time.monotonic(), value))
        self._outstanding.remove(deferred)
        if isinstance(value, ConnectionFailed) and not isinstance(value, OutcomeUnknown):
            self.running = False
        # Later, so that a failed connection does not recurse here.
        reactor.callLater(0, self._next)  # type: ignore[attr-defined]


def check_outcomes(records: list[CallRecord], allowed_errors: tuple[type, ...]) -> list[Any]:
    """Check each call's single outcome and deadline; return the errors seen."""
    errors = []
    for record in records:
        assert len(record.outcomes) == 1, f"call {record.expected} ended {len(record.outcomes)} times"
        ended, outcome = record.outcomes[0]
        assert ended - record.sent <= CALL_DEADLINE + DEADLINE_SLACK, f"call {record.expected} overran its deadline"
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, allowed_errors), f"call {record.expected} failed with {outcome!r}"
            errors.append(outcome)
        else:
            assert outcome == record.expected
    return errors


async def start_drivers(
    pki: PKI, port: int, count: int, *, wait_for_connection: bool = True
) -> list[LoadDriver]:
    drivers = []
    for number in range(count):
        client = await connect_client(pki, port, max_in_flight=LOAD_IN_FLIGHT + 1, timeout=CALL_DEADLINE)
        drivers.append(LoadDriver(client, number, wait_for_connection=wait_for_connection))
    for driver in drivers:
        driver.start()
    return drivers


async def stop_drivers(drivers: list[LoadDriver]) -> None:
    await gatherResults([driver.stop() for driver in drivers])
    await close_all([driver.client for driver in drivers])


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest_twisted.ensureDeferred
async def test_restart_during_load(pki: PKI, tmp_path: Path, stop_signal: int) -> None:
    """Across a restart each call returns its own result or a clear error, once and within its deadline."""
    options = ["--shutdown-grace", str(SHUTDOWN_GRACE)]
    first = start_daemon(pki, tmp_path, options)
    second = None
    try:
        port = await deferToThread(first.wait_for_port)
        drivers = await start_drivers(pki, port, 8)
        await sleep(0.5)

        first.process.send_signal(stop_signal)
        status = await deferToThread(first.wait_for_exit, SHUTDOWN_GRACE + CLOSE_TIMEOUT + 10)
        second = start_daemon(pki, tmp_path, options, port=port)
        await deferToThread(second.wait_for_port)
        back = time.monotonic()
        await sleep(1.0)
        await stop_drivers(drivers)
    finally:
        for daemon in (first, second):
            if daemon is not None:
                await deferToThread(daemon.stop, signal.SIGKILL, 10)

    assert status == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
    for driver in drivers:
        errors = check_outcomes(driver.records, CLEAR_ERRORS)
        assert all(error.code == jsonrpc.SHUTTING_DOWN for error in errors if isinstance(error, RemoteError))
        # The client waits for its new connection, so no call made after
        # the restart may fail.
        after_restart = [record for record in driver.records if record.sent > back]
        assert after_restart, "the load did not go on after the restart"
        assert all(record.outcomes[0][1] == record.expected for record in after_restart)
        assert driver.client.stats.unmatched_replies == 0
        assert driver.client.stats.connections == 2


@pytest_twisted.ensureDeferred
async def test_sigterm_during_load(pki: PKI, tmp_path: Path) -> None:
    """
    On SIGTERM calls in flight finish, later requests and calls still running
    at the end of the grace period get a shutdown error, connections end
    with a TLS close-notify, and the daemon exits 0 without waiting past the
    grace period.
    """
    options = ["--shutdown-grace", str(SHUTDOWN_GRACE), "--call-timeout", "60"]
    daemon = start_daemon(pki, tmp_path, options)
    try:
        port = await deferToThread(daemon.wait_for_port)
        slow = await connect_client(pki, port, timeout=CALL_DEADLINE + SHUTDOWN_GRACE)
        stuck = [slow.call("hang"), slow.call("late_echo", 30, "late"), slow.call("block", 30)]
        drivers = await start_drivers(pki, port, 8, wait_for_connection=False)
        # One slow call per driver keeps its connection draining for a
        # while, so that the driver's next requests meet the shutdown.
        finishing = [
            driver.client.call("late_echo", SHUTDOWN_GRACE / 2, driver.number) for driver in drivers
        ]
        # A raw TLS connection shows how the daemon closes it.
        watcher = await deferToThread(TLSDialer(pki, port).open)
        send_frame(watcher, jsonrpc.encode_message(jsonrpc.build_request("late_echo", [0.5, "w"], 1)))
        # A connection is read in order: once these replies are back, every
        # call above is running.
        for client in [slow] + [driver.client for driver in drivers]:
            assert await client.call("echo", "started") == "started"

        watched = deferToThread(read_and_close, watcher)
        daemon.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status = await deferToThread(daemon.wait_for_exit, SHUTDOWN_GRACE + CLOSE_TIMEOUT + 10)
        exited = time.monotonic()

        received, closed = await watched
        finished = await gatherResults(finishing, consumeErrors=True)
        stuck_errors = [await failure_of(call) for call in stuck]
        await stop_drivers(drivers)
        await slow.close()
    finally:
        await deferToThread(daemon.stop, signal.SIGKILL, 10)

    assert status == 0
    # The drain's own bound: the grace period, then CLOSE_TIMEOUT for
    # connections whose close does not complete.
    assert exited - signalled < SHUTDOWN_GRACE + CLOSE_TIMEOUT
    assert finished == [driver.number for driver in drivers]
    assert [json.loads(payload) for payload in netstring_payloads(received)] == [
        jsonrpc.result_reply(1, "w")
    ]
    assert closed == "clean"
    for error in stuck_errors:
        assert isinstance(error, RemoteError)
        assert error.code == jsonrpc.SHUTTING_DOWN
    for driver in drivers:
        errors = check_outcomes(driver.records, (RemoteError, ConnectionFailed))
        refused = [error for error in errors if isinstance(error, RemoteError)]
        assert refused, "no request met the shutdown"
        assert all(error.code == jsonrpc.SHUTTING_DOWN for error in refused)
        assert driver.client.stats.unmatched_replies == 0
    assert "Exiting with 1 blocking method call still running" in daemon.output()


def read_and_close(connection: ssl.SSLSocket) -> tuple[bytes, str]:
    """Read until the peer closes, then close too, as a client that reads all along does."""
    with connection:
        return read_until_closed(connection)


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except Exception as error:
        return error
    raise AssertionError(f"call returned {result!r} instead of failing")
