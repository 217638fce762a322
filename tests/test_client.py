"""
Tests for netrpc.client: the async client against real servers on loopback
in mutual TLS (this project's server and txJSON-RPC's stock one), and its
reconnect logic on a fake clock.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure
from txjsonrpc_ng.netstring.jsonrpc import JSONRPC, RPCFactory
from zope.interface import implementer

from netrpc import demo, jsonrpc
from netrpc.certs import PKI, Usage
from netrpc.client import CLOSE_TIMEOUT, Backoff, Client, Server, connect, connect_mtls
from netrpc.endpoints import MutualTLSServerEndpoint
from netrpc.exceptions import (
    CallTimeout,
    ConnectionFailed,
    OutcomeUnknown,
    PassphraseError,
    RemoteError,
    TLSVerificationError,
    TooManyCallsInFlight,
)
from netrpc.methods import MethodRegistry
from netrpc.passphrase import forget_passphrases
from netrpc.protocol import RPCServerFactory
from tests.daemon_process import DaemonProcess

# Reconnect quickly in tests; the jitter is off so delays are exact.
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.2, jitter=0.0)


def hang() -> Deferred[None]:
    """A method that never replies."""
    return Deferred()


def build_registry() -> MethodRegistry:
    registry = MethodRegistry()
    registry.add_module(demo)
    registry.add_function("hang", hang)
    return registry


class StockCalculator(JSONRPC):  # type: ignore[misc]
    """A service written for txJSON-RPC's stock netstring server."""

    def jsonrpc_multiply(self, a: float, b: float) -> float:
        return a * b

    def jsonrpc_echo(self, value: Any) -> Any:
        return value


@dataclass
class RunningServer:
    """A server listening on loopback behind the mtls: endpoint."""

    endpoint: MutualTLSServerEndpoint
    factory: IProtocolFactory
    port: IListeningPort

    @property
    def number(self) -> int:
        return self.port.getHost().port  # type: ignore[no-any-return, attr-defined]

    @property
    def handshakes(self) -> int:
        return self.endpoint.stats.completed

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a killed server would."""
        for guard in list(self.port.factory.protocols):  # type: ignore[attr-defined]
            guard.transport.abortConnection()
        await self.port.stopListening()


async def start_server(
    pki: PKI,
    factory: IProtocolFactory | None = None,
    *,
    port: int = 0,
    cert: Path | None = None,
    key: Path | None = None,
) -> RunningServer:
    description = (
        f"mtls:port={port}:interface=127.0.0.1"
        f":privateKey={key or pki.server_key}:certKey={cert or pki.server_cert}"
        f":caCerts={pki.client_ca_cert}:crl={pki.crl}"
    )
    endpoint = serverFromString(reactor, description)
    factory = factory or RPCServerFactory(build_registry())
    listening = await endpoint.listen(factory)
    return RunningServer(endpoint, factory, listening)


def client_description(
    pki: PKI, port: int, *, name: str = "alice", ca: Path | None = None, server_name: str = "127.0.0.1"
) -> str:
    return (
        f"mtls:host=127.0.0.1:port={port}:privateKey={pki.client_key(name)}"
        f":certKey={pki.client_cert(name)}:caCerts={ca or pki.server_ca_cert}"
        f":serverName={server_name}"
    )


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms until it holds, failing after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await sleep(0.01)
    raise AssertionError(f"condition not met within {seconds} s")


async def failure_of(deferred: Deferred[Any]) -> Exception:
    """Wait for ``deferred`` and return the exception it failed with."""
    try:
        result = await deferred
    except Exception as error:
        return error
    raise AssertionError(f"expected a failure, got the result {result!r}")


@pytest_twisted.async_yield_fixture
async def server(pki: PKI) -> Any:
    running = await start_server(pki)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def client(pki: PKI, server: RunningServer) -> Any:
    connected = await connect(reactor, client_description(pki, server.number), backoff=FAST_BACKOFF)
    yield connected
    await connected.close()


# --- Calls on one connection -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_positional_and_named(client: Client) -> None:
    assert await client.call("multiply", 6, 7) == 42
    assert await client.call("echo", value={"nested": [1, "two"]}) == {"nested": [1, "two"]}


@pytest_twisted.ensureDeferred
async def test_call_remote_error(client: Client) -> None:
    """A JSON-RPC error reply fails the call with its code, message and data."""
    error = await failure_of(client.call("multiply", "six", 7))

    assert isinstance(error, RemoteError)
    assert error.code == jsonrpc.INVALID_PARAMS
    assert "expected a number" in str(error.data)


@pytest_twisted.ensureDeferred
async def test_call_unknown_method(client: Client) -> None:
    error = await failure_of(client.call("no.such.method"))

    assert isinstance(error, RemoteError)
    assert error.code == jsonrpc.METHOD_NOT_FOUND


@pytest_twisted.ensureDeferred
async def test_pipelined_calls_one_handshake(pki: PKI, server: RunningServer) -> None:
    """10,000 calls, at most 100 in flight, each get their own result over one handshake."""
    client = await connect(reactor, client_description(pki, server.number), max_in_flight=100)
    peak = 0

    def check(result: Any, number: int) -> None:
        nonlocal peak
        peak = max(peak, client.in_flight + 1)
        assert result == number * 3

    calls = []
    for number in range(10_000):
        calls.append(client.call("multiply", number, 3).addCallback(check, number))
    await gatherResults(calls, consumeErrors=True)
    await client.close()

    assert server.handshakes == 1
    assert client.stats.connections == 1
    assert 1 < peak <= 100


@pytest_twisted.ensureDeferred
async def test_deadline_on_silent_server(client: Client, server: RunningServer) -> None:
    """A call the server never replies to fails within 1.5 s; the connection stays usable."""
    started = reactor.seconds()
    error = await failure_of(client.call("hang", timeout=1.0))
    elapsed = reactor.seconds() - started

    assert isinstance(error, CallTimeout)
    assert "'hang'" in str(error)
    assert "within 1 s" in str(error)
    assert 1.0 <= elapsed < 1.5
    assert await client.call("multiply", 2, 3) == 6
    assert server.handshakes == 1


@pytest_twisted.ensureDeferred
async def test_late_reply_dropped_and_counted(client: Client) -> None:
    error = await failure_of(client.call("sleep", 0.3, timeout=0.1))
    await sleep(0.4)

    assert isinstance(error, CallTimeout)
    assert client.stats.late_replies == 1
    assert await client.call("echo", "next") == "next"


@pytest_twisted.ensureDeferred
async def test_cancel_fails_at_once(client: Client) -> None:
    call = client.call("hang")
    await sleep(0.05)
    assert client.in_flight == 1

    call.cancel()
    error = await failure_of(call)

    assert isinstance(error, CancelledError)
    assert client.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_batch_results_in_order(client: Client) -> None:
    """A failed entry contains its RemoteError; the other entries keep their results."""
    results = await client.batch([("multiply", [2, 3]), ("no_such", []), ("echo", {"value": "x"})])

    assert results[0] == 6
    assert isinstance(results[1], RemoteError)
    assert results[1].code == jsonrpc.METHOD_NOT_FOUND
    assert results[2] == "x"


@pytest_twisted.ensureDeferred
async def test_batch_rejects_empty(client: Client) -> None:
    with pytest.raises(ValueError, match="empty"):
        client.batch([])


@pytest_twisted.ensureDeferred
async def test_notify_sends_without_reply(client: Client) -> None:
    assert await client.notify("echo", "ignored") is None
    assert await client.call("echo", "after") == "after"
    assert client.stats.unmatched_replies == 0


@pytest_twisted.ensureDeferred
async def test_mixed_params_rejected(client: Client) -> None:
    with pytest.raises(TypeError, match="mixes positional and keyword"):
        client.call("echo", 1, value=2)


@pytest_twisted.ensureDeferred
async def test_unencodable_params_rejected(client: Client) -> None:
    with pytest.raises(ValueError, match="cannot encode the params of 'echo'"):
        client.call("echo", float("nan"))


@pytest_twisted.ensureDeferred
async def test_when_full_fail(pki: PKI, server: RunningServer) -> None:
    client = await connect(
        reactor, client_description(pki, server.number), max_in_flight=2, when_full="fail"
    )
    first, second = client.call("hang"), client.call("hang")
    error = await failure_of(client.call("echo", 1))
    batch_error = await failure_of(client.batch([("echo", [1])]))
    await client.close()
    await failure_of(first)
    await failure_of(second)

    assert isinstance(error, TooManyCallsInFlight)
    assert "2 calls in flight to " in str(error)
    assert "reached the maximum of 2" in str(error)
    assert str(batch_error).startswith("batch of 1 call ('echo') was rejected")


@pytest_twisted.ensureDeferred
async def test_when_full_waits_for_place(pki: PKI, server: RunningServer) -> None:
    """A call beyond the limit waits until a place frees, then runs."""
    client = await connect(reactor, client_description(pki, server.number), max_in_flight=1)
    slow = client.call("sleep", 0.2)
    queued = client.call("echo", "queued")

    assert client.in_flight == 1
    assert await queued == "queued"
    assert await slow == 0.2
    await client.close()


@pytest_twisted.ensureDeferred
async def test_reply_above_max_size(pki: PKI, server: RunningServer) -> None:
    """A reply longer than max_reply_size drops the connection before it is buffered."""
    client = await connect(
        reactor, client_description(pki, server.number), max_reply_size=200, backoff=FAST_BACKOFF
    )
    error = await failure_of(client.call("echo", "x" * 1000))

    assert isinstance(error, OutcomeUnknown)
    assert "above the maximum of 200 bytes" in str(error)
    assert await client.call("echo", "small") == "small"
    await client.close()


class GarbageReplies(NetstringReceiver):
    """A server that replies to every request with a frame that is not JSON."""

    def stringReceived(self, string: bytes) -> None:
        self.sendString(b"this is not JSON")


@pytest_twisted.ensureDeferred
async def test_invalid_reply_drops_connection(pki: PKI) -> None:
    server = await start_server(pki, Factory.forProtocol(GarbageReplies))
    client = await connect(reactor, client_description(pki, server.number), backoff=FAST_BACKOFF)
    try:
        error = await failure_of(client.call("echo", 1))
    finally:
        await client.close()
        await server.stop()

    assert isinstance(error, OutcomeUnknown)
    assert "invalid reply from server" in str(error)


@pytest_twisted.ensureDeferred
async def test_close_fails_waiting_calls(client: Client) -> None:
    call = client.call("hang")
    await client.close()
    error = await failure_of(call)

    assert isinstance(error, ConnectionFailed)
    assert "closed" in str(error)
    assert isinstance(await failure_of(client.call("echo", 1)), ConnectionFailed)


# --- Lost connections and reconnects ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_killed_then_restarted(pki: PKI) -> None:
    """Killing the server fails every call in flight; the client reconnects by itself."""
    server = await start_server(pki)
    number = server.number
    client = await connect(reactor, client_description(pki, number), backoff=FAST_BACKOFF)
    calls = [client.call("hang") for _ in range(5)]
    await sleep(0.05)

    await server.stop()
    errors = [await failure_of(call) for call in calls]
    assert all(isinstance(error, OutcomeUnknown) for error in errors)
    assert all(f"127.0.0.1:{number}" in str(error) for error in errors)
    assert not client.connected

    restarted = await start_server(pki, port=number)
    try:
        assert await client.call("multiply", 3, 4, timeout=5) == 12
        assert client.stats.connections == 2
    finally:
        await client.close()
        await restarted.stop()


@pytest_twisted.ensureDeferred
async def test_calls_while_disconnected(pki: PKI) -> None:
    """Without a server, a call waits until its deadline, or fails at once on request."""
    server = await start_server(pki)
    client = await connect(reactor, client_description(pki, server.number), backoff=FAST_BACKOFF)
    await server.stop()
    await wait_until(lambda: not client.connected)

    at_once = await failure_of(client.call("echo", 1, wait_for_connection=False))
    started = reactor.seconds()
    # Twisted's HostnameEndpoint reports a refused connection after 0.3 s.
    waited = await failure_of(client.call("echo", 1, timeout=0.6))
    elapsed = reactor.seconds() - started
    await client.close()

    assert isinstance(at_once, ConnectionFailed)
    assert "not connected" in str(at_once)
    assert isinstance(waited, ConnectionFailed)
    assert "no connection" in str(waited)
    assert "refused" in str(waited)
    assert 0.6 <= elapsed < 1.2


@pytest_twisted.ensureDeferred
async def test_call_made_while_down_runs_after_reconnect(pki: PKI) -> None:
    server = await start_server(pki)
    number = server.number
    client = await connect(reactor, client_description(pki, number), backoff=FAST_BACKOFF)
    await server.stop()
    await wait_until(lambda: not client.connected)
    waiting = client.call("echo", "later", timeout=5)

    restarted = await start_server(pki, port=number)
    try:
        assert await waiting == "later"
    finally:
        await client.close()
        await restarted.stop()


# --- Servers that shut down ---------------------------------------------------


async def draining_pair(pki: PKI) -> tuple[RunningServer, RunningServer, Client]:
    """Start servers A and B, and a client connected to A that is given both."""
    first, second = await start_server(pki), await start_server(pki)
    servers = [client_description(pki, first.number), client_description(pki, second.number)]
    client = await connect(reactor, servers, backoff=FAST_BACKOFF, random=lambda: 0.0)
    return first, second, client


async def stop_draining(first: RunningServer, second: RunningServer, client: Client) -> None:
    await client.close()
    await second.stop()
    if first.port.connected:  # type: ignore[attr-defined]
        await first.stop()


@pytest_twisted.ensureDeferred
async def test_not_started_call_goes_to_next_server(pki: PKI) -> None:
    """A call that a draining server rejects unstarted runs on the next server, idempotent or not."""
    first, second, client = await draining_pair(pki)
    try:
        running = client.call("sleep", 0.3)
        await sleep(0.05)
        await first.port.stopListening()
        drained = first.factory.drain(5)  # type: ignore[attr-defined]
        rejected_there = client.call("echo", "moved", timeout=5)

        assert await rejected_there == "moved"
        assert await running == 0.3
        await drained
        assert client.stats.retried_calls == 1
        assert client.server == f"127.0.0.1:{second.number}"
    finally:
        await stop_draining(first, second, client)


@pytest_twisted.ensureDeferred
async def test_draining_connection_gets_no_new_call(pki: PKI) -> None:
    """After a shutdown reply, new calls wait for the next server instead of meeting the drain."""
    first, second, client = await draining_pair(pki)
    try:
        running = client.call("sleep", 0.5)
        await sleep(0.05)
        await first.port.stopListening()
        drained = first.factory.drain(5)  # type: ignore[attr-defined]
        await client.call("echo", "first", timeout=5)
        later = [client.call("echo", n, timeout=5) for n in range(3)]

        assert await gatherResults(later) == [0, 1, 2]
        assert await running == 0.5
        await drained
        # Only the first echo met the drain; the later ones were held back.
        assert client.stats.retried_calls == 1
    finally:
        await stop_draining(first, second, client)


@pytest_twisted.ensureDeferred
async def test_stopped_call_not_resent(pki: PKI) -> None:
    """A call stopped at the end of the drain may have run: it fails unless idempotent."""
    first, second, client = await draining_pair(pki)
    try:
        plain = client.call("sleep", 1.0, timeout=5)
        idempotent = client.call("sleep", 1.0, timeout=5, idempotent=True)
        await sleep(0.05)
        await first.port.stopListening()
        drained = first.factory.drain(0.1)  # type: ignore[attr-defined]

        error = await failure_of(plain)
        assert isinstance(error, RemoteError)
        assert error.code == jsonrpc.SHUTTING_DOWN
        assert error.data != jsonrpc.NOT_STARTED
        assert await idempotent == 1.0
        await drained
    finally:
        await stop_draining(first, second, client)


@pytest_twisted.ensureDeferred
async def test_not_started_without_waiting(pki: PKI) -> None:
    """With wait_for_connection false, a call rejected by a draining server fails at once."""
    first, second, client = await draining_pair(pki)
    try:
        running = client.call("sleep", 0.3)
        await sleep(0.05)
        await first.port.stopListening()
        drained = first.factory.drain(5)  # type: ignore[attr-defined]
        error = await failure_of(client.call("echo", "x", wait_for_connection=False))

        assert isinstance(error, RemoteError)
        assert error.data == jsonrpc.NOT_STARTED
        assert await running == 0.3
        await drained
    finally:
        await stop_draining(first, second, client)


def start_daemon(pki: PKI, directory: Path, port: int = 0) -> DaemonProcess:
    """Start ``twistd -n securerpc`` with the demo service on loopback."""
    arguments = ["--pki", str(pki.directory), "--listen", f"mtls:port={port}:interface=127.0.0.1"]
    if os.geteuid() == 0:
        # As root the daemon must drop its privileges to run at all.
        arguments += ["--user", "nobody"]
    return DaemonProcess(arguments, directory)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_daemon_killed_then_restarted(pki: PKI, tmp_path: Path) -> None:
    """Killing the daemon process mid-call fails the calls; a new daemon is found by itself."""
    daemon = start_daemon(pki, tmp_path)
    restarted = None
    try:
        port = await deferToThread(daemon.wait_for_port)
        client = await connect(reactor, client_description(pki, port), backoff=FAST_BACKOFF)
        calls = [client.call("sleep", 5) for _ in range(3)]
        await sleep(0.2)

        daemon.process.kill()
        errors = [await failure_of(call) for call in calls]
        assert all(isinstance(error, OutcomeUnknown) for error in errors)

        restarted = start_daemon(pki, tmp_path, port)
        await deferToThread(restarted.wait_for_port)
        assert await client.call("multiply", 6, 7, timeout=10) == 42
        assert client.stats.connections == 2
        await client.close()
    finally:
        for process in (daemon, restarted):
            if process is not None:
                await deferToThread(process.stop, signal.SIGKILL, 10)


@pytest_twisted.ensureDeferred
async def test_failover_retries_idempotent(pki: PKI) -> None:
    """After a loss, an idempotent call is retried on the next server; others fail."""
    first, second = await start_server(pki), await start_server(pki)
    client = await connect(
        reactor,
        [client_description(pki, first.number), client_description(pki, second.number)],
        backoff=FAST_BACKOFF,
        random=lambda: 0.0,
    )
    assert client.server == f"127.0.0.1:{first.number}"
    retried = client.call("sleep", 0.2, idempotent=True, timeout=5)
    unsafe = client.call("sleep", 0.2, timeout=5)
    await sleep(0.05)

    await first.stop()
    try:
        assert await retried == 0.2
        error = await failure_of(unsafe)
        assert isinstance(error, OutcomeUnknown)
        assert "outcome is unknown" in str(error)
        assert client.server == f"127.0.0.1:{second.number}"
        assert client.stats.retried_calls == 1
    finally:
        await client.close()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_connect_fails_when_no_server(pki: PKI) -> None:
    server = await start_server(pki)
    number = server.number
    await server.stop()

    error = await failure_of(connect(reactor, client_description(pki, number)))

    assert isinstance(error, ConnectionFailed)
    assert f"127.0.0.1:{number}" in str(error)


# --- TLS verification -------------------------------------------------------


@pytest.fixture(scope="module")
def server_from_client_ca(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1, wrongly signed by the client CA."""
    directory = tmp_path_factory.mktemp("wrong-server")
    cert, key = directory / "server.crt", directory / "server.key"
    issued = pki.client_authority().issue(
        "localhost", usage=Usage.SERVER, names=["localhost", "127.0.0.1"]
    )
    issued.write(cert, key)
    return cert, key


@pytest_twisted.ensureDeferred
async def test_rejects_unknown_server_ca(pki: PKI, other_pki: PKI, server: RunningServer) -> None:
    description = client_description(pki, server.number, ca=other_pki.server_ca_cert)
    error = await failure_of(connect(reactor, description))

    assert isinstance(error, TLSVerificationError)
    assert error.reason == "unknown CA"
    assert "not a trusted CA" in str(error)


@pytest_twisted.ensureDeferred
async def test_rejects_name_mismatch(pki: PKI, server: RunningServer) -> None:
    description = client_description(pki, server.number, server_name="rpc.example.org")
    error = await failure_of(connect(reactor, description))

    assert isinstance(error, TLSVerificationError)
    assert error.reason == "name mismatch"
    assert "rpc.example.org" in str(error)


@pytest_twisted.ensureDeferred
async def test_rejects_server_cert_from_client_ca(
    pki: PKI, server_from_client_ca: tuple[Path, Path]
) -> None:
    cert, key = server_from_client_ca
    server = await start_server(pki, cert=cert, key=key)
    try:
        error = await failure_of(connect(reactor, client_description(pki, server.number)))
    finally:
        await server.stop()

    assert isinstance(error, TLSVerificationError)
    assert error.reason == "unknown CA"
    assert "client CA" in str(error)


@pytest_twisted.ensureDeferred
async def test_server_rejects_client_cert(pki: PKI, other_pki: PKI, server: RunningServer) -> None:
    """A client certificate from another CA fails the connect or the first call with the reason."""
    description = (
        f"mtls:host=127.0.0.1:port={server.number}:privateKey={other_pki.client_key('alice')}"
        f":certKey={other_pki.client_cert('alice')}:caCerts={pki.server_ca_cert}"
    )
    try:
        client = await connect(reactor, description, backoff=FAST_BACKOFF)
    except TLSVerificationError as error:
        rejected = error
    else:
        rejected = await failure_of(client.call("echo", 1, timeout=5))  # type: ignore[assignment]
        await client.close()

    assert isinstance(rejected, TLSVerificationError)
    assert rejected.reason == "unknown CA"
    assert "rejected this client" in str(rejected)


# --- Encrypted client keys --------------------------------------------------


@pytest.fixture(scope="module")
def carol(pki: PKI) -> tuple[Path, Path]:
    """Client carol, whose key is encrypted with the passphrase 'open sesame'."""
    return pki.issue_client("carol", key_passphrase=b"open sesame")


@pytest.fixture(autouse=True)
def no_remembered_passphrases() -> Iterator[None]:
    forget_passphrases()
    yield
    forget_passphrases()


@pytest_twisted.ensureDeferred
async def test_encrypted_key_unlocked_once(
    pki: PKI, server: RunningServer, carol: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The passphrase is read once; later clients of the process reuse it."""
    cert, key = carol
    monkeypatch.setenv("NETRPC_KEY_PASSPHRASE", "open sesame")
    first = await connect_mtls(
        reactor, "127.0.0.1", server.number, cert=cert, key=key, ca=pki.server_ca_cert
    )
    results = await gatherResults([first.call("multiply", n, 2) for n in range(50)])
    await first.close()

    monkeypatch.delenv("NETRPC_KEY_PASSPHRASE")
    second = await connect_mtls(
        reactor, "127.0.0.1", server.number, cert=cert, key=key, ca=pki.server_ca_cert
    )
    whoami = await second.call("whoami")
    await second.close()

    assert results == [n * 2 for n in range(50)]
    assert whoami["common_name"] == "carol"


def test_wrong_passphrase_fails_once(pki: PKI, carol: tuple[Path, Path]) -> None:
    cert, key = carol
    with pytest.raises(PassphraseError, match="wrong passphrase for private key") as caught:
        connect_mtls(
            reactor, "127.0.0.1", 1, cert=cert, key=key, ca=pki.server_ca_cert, passphrase="wrong"
        )
    assert "from the passphrase given" in str(caught.value)


def test_encrypted_key_in_description_without_passphrase(
    pki: PKI, carol: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = carol
    monkeypatch.delenv("NETRPC_KEY_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin", None)
    description = f"mtls:host=127.0.0.1:port=1:privateKey={key}:certKey={cert}:caCerts={pki.server_ca_cert}"

    with pytest.raises(PassphraseError, match="is encrypted and no passphrase was given") as caught:
        connect(reactor, description)
    assert "add passphraseFile=PATH" in str(caught.value)


# --- Interop with txJSON-RPC's stock server ---------------------------------


@pytest_twisted.ensureDeferred
async def test_stock_txjsonrpc_server(pki: PKI) -> None:
    """The client works against txJSON-RPC's own netstring server in mutual TLS."""
    stock = RPCFactory(StockCalculator, maxLength=64 * 1024)
    server = await start_server(pki, stock)
    client = await connect(reactor, client_description(pki, server.number))
    try:
        assert await client.call("multiply", 6, 7) == 42
        assert await client.call("echo", value=[1, "a"]) == [1, "a"]
        products = await gatherResults([client.call("multiply", n, n) for n in range(200)])
        missing = await failure_of(client.call("divide", 1, 2))
        await client.notify("echo", "note")
        after = await client.call("echo", "after the notification")
        batch = await failure_of(client.batch([("echo", [1])], timeout=0.3))
    finally:
        await client.close()
        await server.stop()

    assert products == [n * n for n in range(200)]
    assert isinstance(missing, RemoteError)
    assert missing.code == jsonrpc.METHOD_NOT_FOUND
    assert after == "after the notification"
    assert server.handshakes == 1
    # The stock server replies to notifications too, and to a batch with one
    # error, both with a null id; the client drops and counts them.
    assert isinstance(batch, CallTimeout)
    assert client.stats.unmatched_replies == 2


# --- Reconnect logic on a fake clock ----------------------------------------


class AbortableTransport(StringTransport):
    """A memory transport that ignores a clean close but honours an abort, as a silent peer would."""

    def abortConnection(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint on a memory transport, made to fail on request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts = 0
        self.refuse = False
        self.protocol: Any = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError())
        self.protocol = factory.buildProtocol(None)
        transport = AbortableTransport()
        transport.protocol = self.protocol
        self.protocol.makeConnection(transport)
        return succeed(self.protocol)

    def drop(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def fake_client(clock: Clock, *endpoints: FakeEndpoint, **options: Any) -> Client:
    servers = [Server(endpoint, endpoint.name) for endpoint in endpoints]
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.0)
    started = connect(clock, servers, backoff=backoff, random=lambda: 0.0, **options)
    return started.result  # type: ignore[attr-defined, no-any-return]


def test_reconnect_backoff_grows_and_caps() -> None:
    clock, endpoint = Clock(), FakeEndpoint("a")
    client = fake_client(clock, endpoint)
    endpoint.refuse = True
    endpoint.drop()

    delays = []
    for _ in range(6):
        (pending,) = clock.getDelayedCalls()
        delays.append(pending.getTime() - clock.seconds())
        clock.advance(delays[-1])

    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert client.stats.connection_failures == 6


def test_reconnect_resets_after_stable_connection() -> None:
    clock, endpoint = Clock(), FakeEndpoint("a")
    client = fake_client(clock, endpoint)
    endpoint.refuse = True
    endpoint.drop()
    clock.advance(1.0)
    clock.advance(2.0)
    endpoint.refuse = False
    clock.advance(4.0)
    assert client.connected

    clock.advance(60.0)
    endpoint.drop()
    (pending,) = clock.getDelayedCalls()

    assert pending.getTime() - clock.seconds() == 1.0


def test_failover_alternates_servers() -> None:
    clock = Clock()
    first, second = FakeEndpoint("first"), FakeEndpoint("second")
    client = fake_client(clock, first, second)
    assert client.server == "first"

    first.refuse = second.refuse = True
    first.drop()
    clock.advance(1.0)
    clock.advance(1.0)

    assert (first.attempts, second.attempts) == (2, 1)
    assert client.server == "second"


def test_initial_connect_tries_each_server() -> None:
    clock = Clock()
    first, second = FakeEndpoint("first"), FakeEndpoint("second")
    first.refuse = True
    client = fake_client(clock, first, second)

    assert client.connected
    assert client.server == "second"


def test_backoff_jitter_bounds() -> None:
    low = Backoff(initial=1.0, maximum=10.0, jitter=0.5, random=lambda: 0.999999)
    high = Backoff(initial=1.0, maximum=10.0, jitter=0.5, random=lambda: 0.0)

    assert 0.5 <= low.delay(0) < 0.51
    assert high.delay(0) == 1.0
    assert high.delay(10**6) == 10.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"initial": 0.0}, "must be positive"),
        ({"initial": 5.0, "maximum": 1.0}, "at most the maximum"),
        ({"multiplier": 0.5}, "at least 1"),
        ({"jitter": 2.0}, "between 0 and 1"),
    ],
)
def test_backoff_rejects_bad_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**options)


def test_deadline_while_disconnected_on_clock() -> None:
    """A call waiting for a connection fails at its deadline, naming the last error."""
    clock, endpoint = Clock(), FakeEndpoint("a")
    client = fake_client(clock, endpoint)
    endpoint.refuse = True
    endpoint.drop()
    call = client.call("echo", 1, timeout=3.5)
    failures: list[Failure] = []
    call.addErrback(failures.append)

    clock.advance(1.0)
    clock.advance(2.0)
    clock.advance(0.5)

    (failure,) = failures
    assert failure.check(ConnectionFailed)
    assert "no connection to a within 3.5 s" in str(failure.value)
    assert "refused" in str(failure.value)


def test_close_aborts_when_server_silent() -> None:
    """close() drops a connection whose server never confirms the close."""
    clock, endpoint = Clock(), FakeEndpoint("a")
    client = fake_client(clock, endpoint)
    closing = client.close()
    assert not closing.called

    clock.advance(CLOSE_TIMEOUT)

    assert closing.called
    assert not client.connected
