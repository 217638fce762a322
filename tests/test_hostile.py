"""
Hostile input against a real ``twistd securerpc`` process over mutual TLS:
broken netstrings, plain TCP and HTTP on the TLS port, and methods that
raise, hang, return what JSON cannot encode or block a thread. Each must
cost only its own connection or call, never a bystander's.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from netrpc import jsonrpc
from netrpc.certs import PKI
from netrpc.client import Client, connect
from netrpc.exceptions import RemoteError
from tests.daemon_process import DaemonProcess
from tests.fault_daemon import (
    TLSDialer,
    client_description,
    lines_about,
    netstring_payloads,
    read_until_closed,
    send_frame,
    start_daemon,
)

pytestmark = pytest.mark.e2e

# Short enough that calls which hang end quickly, long enough for the calls
# that must succeed on a loaded machine.
CALL_TIMEOUT = 2.0
MAX_MESSAGE_SIZE = 4096


@pytest.fixture(scope="module")
def daemon(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """
    One daemon for the module; each test finds its own log lines by its
    source port. The daemon logs at most 5 rejected handshakes per address
    and minute, and the tests here cause 4.
    """
    options = ["--call-timeout", str(CALL_TIMEOUT), "--max-message-size", str(MAX_MESSAGE_SIZE)]
    process = start_daemon(pki, tmp_path_factory.mktemp("hostile"), options)
    process.wait_for_port()
    yield process
    process.stop(signal.SIGKILL, timeout=10)


@pytest.fixture(scope="module")
def port(daemon: DaemonProcess) -> int:
    return daemon.wait_for_port()


@pytest.fixture(scope="module")
def dialer(pki: PKI, port: int) -> TLSDialer:
    return TLSDialer(pki, port)


def request_text(method: str, params: list[Any], request_id: int) -> str:
    return json.dumps(jsonrpc.build_request(method, params, request_id))


def wait_for_log(daemon: DaemonProcess, source_port: int, text: str) -> str:
    """Wait until the daemon logs a line about ``source_port`` containing ``text``."""
    pattern = rf"^(?=.*127\.0\.0\.1:{source_port}(?!\d))(?=.*{re.escape(text)})"
    return daemon.wait_for_line(pattern, timeout=10).string


@pytest.mark.parametrize(
    ("data", "reason", "replied"),
    [
        (b"05:hello,", "has a leading zero", False),
        (b"x:hello,", "does not start with a digit", False),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "does not start with a digit", False),
        (b"5;hello,", "instead of a colon", False),
        (b"99999:", f"above the maximum of {MAX_MESSAGE_SIZE} bytes", True),
        (b"99999999999999999999999:", f"above the maximum of {MAX_MESSAGE_SIZE} bytes", True),
        (b"5:hello!", "not followed by a comma", True),
    ],
)
def test_framing_error_closes(
    daemon: DaemonProcess, dialer: TLSDialer, data: bytes, reason: str, replied: bool
) -> None:
    """A broken netstring closes its connection cleanly, after a parse error where it can."""
    bystander = dialer.open()
    send_frame(bystander, request_text("late_echo", [0.2, "bystander"], 1))

    with dialer.open() as attacker:
        source_port = attacker.getsockname()[1]
        send_frame(attacker, request_text("echo", ["before"], 7))
        attacker.sendall(data)
        received, closed = read_until_closed(attacker)

    replies = [json.loads(payload) for payload in netstring_payloads(received)]
    assert closed == "clean"
    assert replies[0] == jsonrpc.result_reply(7, "before")
    if replied:
        (error,) = replies[1:]
        assert error["id"] is None
        assert error["error"]["code"] == jsonrpc.PARSE_ERROR
        assert reason in error["error"]["data"]
    else:
        assert replies[1:] == []

    wait_for_log(daemon, source_port, reason)
    (line,) = lines_about(daemon, source_port)
    assert f"Closing connection from 127.0.0.1:{source_port}: " in line

    with bystander:
        (payload,) = netstring_payloads(bystander.recv(65536))
        assert json.loads(payload) == jsonrpc.result_reply(1, "bystander")
        send_frame(bystander, request_text("multiply", [6, 7], 2))
        (payload,) = netstring_payloads(bystander.recv(65536))
        assert json.loads(payload) == jsonrpc.result_reply(2, 42)


def test_close_not_answered(daemon: DaemonProcess, dialer: TLSDialer) -> None:
    """A peer that never answers the server's close-notify cannot keep its connection open."""
    with dialer.open() as connection:
        source_port = connection.getsockname()[1]
        connection.sendall(b"x")
        wait_for_log(daemon, source_port, "does not start with a digit")
        line = wait_for_log(daemon, source_port, "no TLS close-notify in reply within 5 s")
    assert "Aborting connection from" in line


@pytest.mark.parametrize("close_notify", [True, False], ids=["close-notify", "tcp-fin"])
def test_frame_cut_by_eof(daemon: DaemonProcess, dialer: TLSDialer, close_notify: bool) -> None:
    """A peer that closes in the middle of a frame is logged once, with its address."""
    connection = dialer.open()
    source_port = connection.getsockname()[1]
    connection.sendall(b"100:" + b"x" * 40)
    if close_notify:
        connection.unwrap().close()
    else:
        # SSLSocket.shutdown sends a TCP FIN without a TLS close-notify.
        connection.shutdown(socket.SHUT_WR)
        read_until_closed(connection)
        connection.close()

    line = wait_for_log(daemon, source_port, "closed in the middle of a frame")
    assert lines_about(daemon, source_port) == [line]


@pytest.mark.parametrize(
    "data",
    [b"hello\r\n", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x00" * 64],
    ids=["text", "http", "zeros"],
)
def test_plain_tcp_closed(daemon: DaemonProcess, port: int, data: bytes) -> None:
    """Bytes that cannot start a TLS handshake get the connection closed and one log line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        source_port = connection.getsockname()[1]
        connection.sendall(data)
        received, closed = read_until_closed(connection)

    assert received == b""
    assert closed == "clean"
    line = wait_for_log(daemon, source_port, "not a TLS client hello")
    assert repr(data[:16]) in line
    assert lines_about(daemon, source_port) == [line]


def test_tls_without_certificate_closed(daemon: DaemonProcess, pki: PKI, port: int) -> None:
    """A TLS client with no certificate is rejected in the handshake, and logged once."""
    context = ssl.create_default_context(cafile=str(pki.server_ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        source_port = raw.getsockname()[1]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as connection:
                # With TLS 1.3 the rejection arrives after the client's handshake.
                connection.recv(1)

    line = wait_for_log(daemon, source_port, "Rejected TLS handshake")
    assert lines_about(daemon, source_port) == [line]


async def connect_client(pki: PKI, port: int) -> Client:
    return await connect(reactor, client_description(pki, port), timeout=30)


async def failure_of(deferred: Deferred[Any]) -> BaseException:
    try:
        result = await deferred
    except Exception as error:
        return error
    raise AssertionError(f"call returned {result!r} instead of failing")


@pytest_twisted.ensureDeferred
async def test_method_faults_isolated(daemon: DaemonProcess, pki: PKI, port: int) -> None:
    """Methods that raise, hang, cannot be encoded or block a thread cost only their own call."""
    faulty = await connect_client(pki, port)
    bystander = await connect_client(pki, port)
    try:
        hang = faulty.call("hang")
        blocked = faulty.call("block", CALL_TIMEOUT + 1)
        raised = faulty.call("explode", "boom")
        unencodable = faulty.call("unencodable")
        short_block = faulty.call("block", 0.1)

        # Both connections keep serving while the hanging calls wait for
        # their deadline.
        assert await faulty.call("echo", "same connection") == "same connection"
        assert await bystander.call("multiply", 6, 7) == 42
        assert not hang.called
        assert not blocked.called
        assert await short_block == 0.1

        error = await failure_of(raised)
        assert isinstance(error, RemoteError)
        assert error.code == jsonrpc.INTERNAL_ERROR
        assert "boom" not in str(error)
        error_id = error.data["error_id"]
        line = await deferToThread(daemon.wait_for_line, f"Call to explode .*error id {error_id}")
        assert "failed" in line.string

        error = await failure_of(unencodable)
        assert isinstance(error, RemoteError)
        assert error.code == jsonrpc.INTERNAL_ERROR
        error_id = error.data["error_id"]
        await deferToThread(daemon.wait_for_line, f"Reply to unencodable .*error id {error_id}")

        for call in (hang, blocked):
            error = await failure_of(call)
            assert isinstance(error, RemoteError)
            assert error.code == jsonrpc.CALL_TIMEOUT
            assert f"within {CALL_TIMEOUT:g} seconds" in error.data

        assert await bystander.call("echo", "after") == "after"
        assert faulty.stats.unmatched_replies == 0
        assert bystander.stats.unmatched_replies == 0
    finally:
        await faulty.close()
        await bystander.close()


@pytest_twisted.ensureDeferred
async def test_batch_with_faults(pki: PKI, port: int) -> None:
    """In one batch, each faulty entry gets its own error and the others their results."""
    client = await connect_client(pki, port)
    try:
        results = await client.batch(
            [
                ("explode", ["boom"]),
                ("echo", ["ok"]),
                ("hang", []),
                ("unencodable", []),
                ("nope", []),
            ]
        )
    finally:
        await client.close()

    codes = [result.code if isinstance(result, RemoteError) else result for result in results]
    assert codes == [
        jsonrpc.INTERNAL_ERROR,
        "ok",
        jsonrpc.CALL_TIMEOUT,
        jsonrpc.INTERNAL_ERROR,
        jsonrpc.METHOD_NOT_FOUND,
    ]


def test_oversized_frame_spares_others(daemon: DaemonProcess, dialer: TLSDialer) -> None:
    """A declared length above the maximum is rejected before its payload is read."""
    with dialer.open() as attacker, dialer.open() as bystander:
        source_port = attacker.getsockname()[1]
        attacker.sendall(b"%d:" % (MAX_MESSAGE_SIZE + 1))
        received, closed = read_until_closed(attacker)
        send_frame(bystander, request_text("echo", ["still here"], 1))
        (payload,) = netstring_payloads(bystander.recv(65536))

    (reply,) = [json.loads(frame) for frame in netstring_payloads(received)]
    assert reply["error"]["code"] == jsonrpc.PARSE_ERROR
    assert closed == "clean"
    assert json.loads(payload) == jsonrpc.result_reply(1, "still here")
    wait_for_log(daemon, source_port, "above the maximum")


def test_daemon_survives(daemon: DaemonProcess, dialer: TLSDialer) -> None:
    """After every attack in this module, the daemon still runs and logged no traceback of its own."""
    with dialer.open() as connection:
        send_frame(connection, request_text("system.health", [], 1))
        (payload,) = netstring_payloads(connection.recv(65536))
    assert json.loads(payload)["result"]["status"] == "serving"
    assert daemon.process.poll() is None
    output = daemon.output()
    assert "Unhandled" not in output
    # The only traceback is the one of the method that raised on purpose.
    assert output.count("Traceback") == output.count("Call to explode")
