"""
Tests of the blocking client against the real daemon on loopback, and
against scripted stdlib servers for timeouts, late replies and certificates
the client must reject.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netrpc.blocking import Client
from netrpc.certs import PKI, IssuedCertificate, Usage
from netrpc.exceptions import (
    CallTimeout,
    ConfigurationError,
    ConnectionFailed,
    OutcomeUnknown,
    PassphraseError,
    RemoteError,
    RemoteProtocolError,
    TLSVerificationError,
)
from netrpc.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, NOT_STARTED, SHUTTING_DOWN
from netrpc.passphrase import PASSPHRASE_VARIABLE, forget_passphrases
from tests.daemon_process import DaemonProcess
from tests.scripted_server import ScriptedServer, ServerConnection

UNPRIVILEGED_USER = "nobody"
PASSPHRASE = b"correct horse battery staple"

ClientFactory = Callable[..., Client]
StartServer = Callable[..., ScriptedServer]


@pytest.fixture(scope="module")
def daemon_port(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Run ``twistd -n securerpc`` on the demo service and return its port."""
    privileges = ["--user", UNPRIVILEGED_USER] if os.geteuid() == 0 else []
    daemon = DaemonProcess(
        ["--pki", str(pki.directory), "--listen", "mtls:port=0:interface=127.0.0.1", *privileges],
        cwd=tmp_path_factory.mktemp("daemon"),
    )
    try:
        yield daemon.wait_for_port()
    finally:
        daemon.stop()


@pytest.fixture
def make_client(pki: PKI) -> Iterator[ClientFactory]:
    """Build clients with alice's files, closing each after the test."""
    clients: list[Client] = []

    def make(port: int, host: str = "127.0.0.1", **options: Any) -> Client:
        settings: dict[str, Any] = {
            "cert": pki.client_cert("alice"),
            "key": pki.client_key("alice"),
            "ca": pki.server_ca_cert,
            "timeout": 5.0,
        }
        settings.update(options)
        client = Client(host, port, **settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def write_pair(issued: IssuedCertificate, directory: Path, name: str) -> tuple[Path, Path]:
    """Write a certificate and its key under ``directory``; return their paths."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    issued.write(cert, key)
    return cert, key


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


# --- Calls against the daemon ----------------------------------------------


def test_call_positional_and_named(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    assert client.call("multiply", 6, 7) == 42
    assert client.call("echo", value={"nested": [1, "two"]}) == {"nested": [1, "two"]}
    assert client.request("echo", {"value": "by request"}) == "by request"


def test_call_reuses_one_connection(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    results = [client.call("multiply", number, 2) for number in range(50)]
    assert results == [number * 2 for number in range(50)]
    assert client.stats.connections == 1


def test_call_localhost_name(daemon_port: int, make_client: ClientFactory) -> None:
    """The DNS name localhost and the IP address 127.0.0.1 both match the server's certificate."""
    assert make_client(daemon_port, host="localhost").call("echo", "dns") == "dns"
    assert make_client(daemon_port, server_name="127.0.0.1").call("echo", "ip") == "ip"


def test_call_unknown_method(daemon_port: int, make_client: ClientFactory) -> None:
    with pytest.raises(RemoteError) as caught:
        make_client(daemon_port).call("no.such.method")
    assert caught.value.code == METHOD_NOT_FOUND


def test_call_invalid_params(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    with pytest.raises(RemoteError) as caught:
        client.call("multiply", "six", 7)
    assert caught.value.code == INVALID_PARAMS
    assert client.call("multiply", 6, 7) == 42


def test_call_mixed_params_rejected(daemon_port: int, make_client: ClientFactory) -> None:
    with pytest.raises(TypeError, match="mixes positional and keyword"):
        make_client(daemon_port).call("echo", 1, value=2)


def test_list_methods(daemon_port: int, make_client: ClientFactory) -> None:
    methods = make_client(daemon_port).call("system.listMethods")
    assert {"echo", "multiply", "sleep", "whoami"} <= set(methods)


def test_whoami_is_alice(daemon_port: int, make_client: ClientFactory) -> None:
    assert make_client(daemon_port).call("whoami")["common_name"] == "alice"


def test_batch_in_order(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    values = client.batch(
        [("multiply", [6, 7]), ("no.such.method", None), ("echo", {"value": "x"})]
    )
    assert values[0] == 42
    assert isinstance(values[1], RemoteError)
    assert values[1].code == METHOD_NOT_FOUND
    assert values[2] == "x"


def test_batch_empty(daemon_port: int, make_client: ClientFactory) -> None:
    with pytest.raises(ValueError, match="empty"):
        make_client(daemon_port).batch([])


def test_notify_then_call(daemon_port: int, make_client: ClientFactory) -> None:
    """A notification gets no reply, so the next call gets its own."""
    client = make_client(daemon_port)
    client.notify("echo", "ignored")
    client.send_notification("multiply", {"a": 1, "b": 2})
    assert client.call("echo", "next") == "next"
    assert client.stats.unmatched_replies == 0


def test_timeout_keeps_connection(daemon_port: int, make_client: ClientFactory) -> None:
    """A timed-out call leaves the connection usable, and its late reply is dropped."""
    client = make_client(daemon_port)
    started = time.monotonic()
    with pytest.raises(CallTimeout, match="no reply within its deadline"):
        client.call("sleep", 0.6, timeout=0.2)
    assert time.monotonic() - started < 0.5

    # The late reply arrives while the client is idle; the next call must
    # drop it and get its own result.
    time.sleep(0.8)
    assert client.call("echo", "fresh") == "fresh"
    assert client.stats.late_replies == 1
    assert client.stats.connections == 1


def test_late_reply_during_next_call(daemon_port: int, make_client: ClientFactory) -> None:
    """The reply of a timed-out call that comes during the next call is not taken for it."""
    client = make_client(daemon_port)
    with pytest.raises(CallTimeout):
        client.call("sleep", 0.3, timeout=0.1)
    assert client.call("sleep", 0.5) == 0.5
    assert client.stats.late_replies == 1


def test_threads_share_client(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    results: dict[int, list[Any]] = {}

    def work(worker: int) -> None:
        results[worker] = [client.call("multiply", worker, number) for number in range(20)]

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {worker: [worker * number for number in range(20)] for worker in range(4)}
    assert client.stats.connections == 1


def test_lock_wait_counts_in_deadline(daemon_port: int, make_client: ClientFactory) -> None:
    """A call waiting for another thread's call times out within its own deadline."""
    client = make_client(daemon_port)
    client.connect()
    slow = threading.Thread(target=client.call, args=("sleep", 1.0))
    slow.start()
    time.sleep(0.3)
    with pytest.raises(CallTimeout, match="waiting for another thread"):
        client.call("echo", "blocked", timeout=0.2)
    slow.join(5)


def test_reply_too_large(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port, max_reply_size=100)
    with pytest.raises(RemoteProtocolError, match="above the maximum of 100 bytes"):
        client.call("echo", "x" * 200)
    assert client.call("echo", "small") == "small"
    assert client.stats.connections == 2


def test_closed_client(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    with client:
        assert client.call("echo", 1) == 1
    with pytest.raises(ConnectionFailed, match="was closed"):
        client.call("echo", 2)


def test_connect_early(daemon_port: int, make_client: ClientFactory) -> None:
    client = make_client(daemon_port)
    client.connect()
    assert client.stats.connections == 1
    assert client.call("echo", 3) == 3
    assert client.stats.connections == 1


# --- Passphrases -----------------------------------------------------------


@pytest.fixture(scope="module")
def encrypted_client(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate from the client CA with a passphrase-protected key."""
    directory = tmp_path_factory.mktemp("encrypted")
    cert, key = directory / "carol.crt", directory / "carol.key"
    issued = pki.client_authority().issue("carol", usage=Usage.CLIENT)
    issued.write(cert, key, passphrase=PASSPHRASE)
    return cert, key


@pytest.fixture(autouse=True)
def no_passphrase_sources(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start each test with no kept passphrase, no variable and no terminal to prompt on."""
    monkeypatch.delenv(PASSPHRASE_VARIABLE, raising=False)
    monkeypatch.setattr("sys.stdin", None)
    forget_passphrases()
    yield
    forget_passphrases()


def test_passphrase_right(
    daemon_port: int, make_client: ClientFactory, encrypted_client: tuple[Path, Path]
) -> None:
    cert, key = encrypted_client
    client = make_client(daemon_port, cert=cert, key=key, passphrase=PASSPHRASE)
    assert client.call("whoami")["common_name"] == "carol"
    assert client.call("echo", "again") == "again"


def test_passphrase_wrong(make_client: ClientFactory, encrypted_client: tuple[Path, Path]) -> None:
    cert, key = encrypted_client
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        make_client(free_port(), cert=cert, key=key, passphrase="not it")


def test_passphrase_missing(make_client: ClientFactory, encrypted_client: tuple[Path, Path]) -> None:
    cert, key = encrypted_client
    with pytest.raises(PassphraseError, match="no passphrase was given") as caught:
        make_client(free_port(), cert=cert, key=key)
    assert "passphrase=" in str(caught.value)
    assert PASSPHRASE_VARIABLE in str(caught.value)


def test_passphrase_environment(
    daemon_port: int,
    make_client: ClientFactory,
    encrypted_client: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blocking client reads the variable, as the async client and netrpc call do."""
    cert, key = encrypted_client
    monkeypatch.setenv(PASSPHRASE_VARIABLE, PASSPHRASE.decode())
    client = make_client(daemon_port, cert=cert, key=key)
    assert client.call("whoami")["common_name"] == "carol"


def test_passphrase_wrong_environment(
    make_client: ClientFactory, encrypted_client: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = encrypted_client
    monkeypatch.setenv(PASSPHRASE_VARIABLE, "not it")
    with pytest.raises(PassphraseError, match=f"from environment variable {PASSPHRASE_VARIABLE}"):
        make_client(free_port(), cert=cert, key=key)


def test_passphrase_file(
    daemon_port: int, make_client: ClientFactory, encrypted_client: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = encrypted_client
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE + b"\n")
    secret.chmod(0o600)
    client = make_client(daemon_port, cert=cert, key=key, passphrase_file=secret)
    assert client.call("whoami")["common_name"] == "carol"


def test_missing_certificate_file(make_client: ClientFactory, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(ConfigurationError, match=str(missing)):
        make_client(free_port(), cert=missing)


def test_invalid_timeout(make_client: ClientFactory) -> None:
    with pytest.raises(ConfigurationError, match="timeout -1 is invalid"):
        make_client(free_port(), timeout=-1)


# --- Server certificates the client must reject ----------------------------


def test_tls_unknown_ca(daemon_port: int, make_client: ClientFactory, other_pki: PKI) -> None:
    with pytest.raises(TLSVerificationError) as caught:
        make_client(daemon_port, ca=other_pki.server_ca_cert).call("echo", 1)
    assert caught.value.reason == "unknown CA"
    assert "server CA" in str(caught.value)


def test_tls_name_mismatch(daemon_port: int, make_client: ClientFactory) -> None:
    with pytest.raises(TLSVerificationError) as caught:
        make_client(daemon_port, server_name="example.org").call("echo", 1)
    assert caught.value.reason == "name mismatch"
    assert "'example.org'" in str(caught.value)


def test_tls_ip_mismatch(daemon_port: int, make_client: ClientFactory) -> None:
    with pytest.raises(TLSVerificationError) as caught:
        make_client(daemon_port, server_name="127.0.0.2").call("echo", 1)
    assert caught.value.reason == "name mismatch"


def serve_certificate(issued: IssuedCertificate, pki: PKI, directory: Path) -> ScriptedServer:
    """Start a server that presents ``issued`` and requires a client certificate."""
    cert, key = write_pair(issued, directory, "server")
    return ScriptedServer(
        ServerConnection.wait_for_close, cert=cert, key=key, client_ca=pki.client_ca_cert
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("from client CA", "unknown CA"),
        ("client usage", "wrong key usage"),
        ("expired", "expired"),
        ("not yet valid", "not yet valid"),
    ],
)
def test_tls_bad_server_certificate(
    case: str, reason: str, pki: PKI, make_client: ClientFactory, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    names = ["localhost", "127.0.0.1"]
    server_ca = pki.server_authority()
    issued = {
        "from client CA": lambda: pki.client_authority().issue(
            "localhost", usage=Usage.SERVER, names=names
        ),
        "client usage": lambda: server_ca.issue("localhost", usage=Usage.CLIENT, names=names),
        "expired": lambda: server_ca.issue(
            "localhost", usage=Usage.SERVER, names=names, not_before=now - 10 * day, not_after=now - day
        ),
        "not yet valid": lambda: server_ca.issue(
            "localhost", usage=Usage.SERVER, names=names, not_before=now + day, not_after=now + 10 * day
        ),
    }[case]()

    with serve_certificate(issued, pki, tmp_path) as server:
        with pytest.raises(TLSVerificationError) as caught:
            make_client(server.port).call("echo", 1)
    assert caught.value.reason == reason


def test_tls_client_rejected(daemon_port: int, make_client: ClientFactory, other_pki: PKI) -> None:
    """A client certificate from another client CA is rejected by the server."""
    client = make_client(
        daemon_port, cert=other_pki.client_cert("alice"), key=other_pki.client_key("alice")
    )
    with pytest.raises(TLSVerificationError) as caught:
        client.call("echo", 1)
    assert "rejected this client's certificate" in str(caught.value)
    assert caught.value.reason == "unknown CA"


# --- Scripted servers ------------------------------------------------------


@pytest.fixture
def scripted(pki: PKI) -> Iterator[StartServer]:
    """Start scripted servers with the PKI's server certificate; close them after the test."""
    servers: list[ScriptedServer] = []

    def start(handler: Callable[[ServerConnection], None], **options: Any) -> ScriptedServer:
        settings: dict[str, Any] = {
            "cert": pki.server_cert,
            "key": pki.server_key,
            "client_ca": pki.client_ca_cert,
        }
        settings.update(options)
        server = ScriptedServer(handler, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        assert server.handler_errors == []


def reply(connection: ServerConnection, request: dict[str, Any], result: Any) -> None:
    connection.send_message({"jsonrpc": "2.0", "id": request["id"], "result": result})


def test_timeout_silent_server(scripted: StartServer, make_client: ClientFactory) -> None:
    """A server that reads but never replies makes a 1-second call fail within 1.5 seconds."""
    server = scripted(ServerConnection.wait_for_close)
    client = make_client(server.port)
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        client.call("echo", 1, timeout=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.5


def test_batch_of_one_timeout(scripted: StartServer, make_client: ClientFactory) -> None:
    server = scripted(ServerConnection.wait_for_close)
    client = make_client(server.port)
    with pytest.raises(CallTimeout, match=r"^batch of 1 call \('echo'\) to "):
        client.batch([("echo", [1])], timeout=0.2)


def test_stale_reply_dropped(scripted: StartServer, make_client: ClientFactory) -> None:
    """A server that replies to the timed-out call first, then to the next one, gives each its own."""

    def late_then_fresh(connection: ServerConnection) -> None:
        first = connection.read_message()
        second = connection.read_message()
        reply(connection, first, "stale")
        reply(connection, second, "fresh")
        connection.wait_for_close()

    client = make_client(scripted(late_then_fresh).port)
    with pytest.raises(CallTimeout):
        client.call("echo", "first", timeout=0.3)
    assert client.call("echo", "second") == "fresh"
    assert client.stats.late_replies == 1


def test_unknown_reply_id(scripted: StartServer, make_client: ClientFactory) -> None:
    def wrong_id(connection: ServerConnection) -> None:
        connection.read_message()
        connection.send_message({"jsonrpc": "2.0", "id": 999, "result": "whose?"})
        connection.wait_for_close()

    with pytest.raises(RemoteProtocolError, match="id 999, which matches no call"):
        make_client(scripted(wrong_id).port).call("echo", 1)


def test_invalid_netstring(scripted: StartServer, make_client: ClientFactory) -> None:
    def garbage(connection: ServerConnection) -> None:
        connection.read_message()
        connection.send_raw(b"not a netstring")
        connection.wait_for_close()

    with pytest.raises(RemoteProtocolError, match="invalid netstring"):
        make_client(scripted(garbage).port).call("echo", 1)


def test_null_id_error(scripted: StartServer, make_client: ClientFactory) -> None:
    """An error with a null id is the reply to the current call when no earlier call waits."""

    def unreadable(connection: ServerConnection) -> None:
        connection.read_message()
        connection.send_message(
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        )
        connection.wait_for_close()

    with pytest.raises(RemoteError) as caught:
        make_client(scripted(unreadable).port).call("echo", 1)
    assert caught.value.code == -32700


def test_lost_after_send(scripted: StartServer, make_client: ClientFactory) -> None:
    def read_and_close(connection: ServerConnection) -> None:
        connection.read_message()

    with pytest.raises(OutcomeUnknown, match="outcome is unknown"):
        make_client(scripted(read_and_close).port).call("echo", 1)


def test_reconnect_after_idle_close(
    scripted: StartServer, make_client: ClientFactory
) -> None:
    """A connection the server closed between calls is replaced without failing the next call."""

    def one_call_per_connection(connection: ServerConnection) -> None:
        request = connection.read_message()
        reply(connection, request, request["params"][0])

    server = scripted(one_call_per_connection)
    client = make_client(server.port)
    assert client.call("echo", "one") == "one"
    time.sleep(0.2)
    assert client.call("echo", "two") == "two"
    assert client.stats.connections == 2
    assert server.accepted == 2


def echo_once(connection: ServerConnection) -> None:
    request = connection.read_message()
    reply(connection, request, request["params"][0])
    connection.wait_for_close()


def tls12_only(ciphers: str) -> Callable[[ssl.SSLContext], None]:
    def configure(context: ssl.SSLContext) -> None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)

    return configure


def test_tls12_aead_accepted(scripted: StartServer, make_client: ClientFactory) -> None:
    server = scripted(echo_once, configure=tls12_only("ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert make_client(server.port).call("echo", "over TLS 1.2") == "over TLS 1.2"


def test_tls12_cbc_rejected(scripted: StartServer, make_client: ClientFactory) -> None:
    """A TLS 1.2 server that offers only a CBC suite shares no suite with the client."""
    server = scripted(echo_once, configure=tls12_only("ECDHE-ECDSA-AES128-SHA256"))
    with pytest.raises(ConnectionFailed, match="shares no TLS version or cipher suite") as caught:
        make_client(server.port).call("echo", 1)
    assert not isinstance(caught.value, TLSVerificationError)


def test_handshake_timeout(scripted: StartServer, make_client: ClientFactory) -> None:
    """A server that accepts TCP but never completes the TLS handshake makes the call time out."""
    server = scripted(ServerConnection.wait_for_close, tls=False)
    with pytest.raises(CallTimeout, match="TLS handshake"):
        make_client(server.port).call("echo", 1, timeout=0.5)


def test_connection_refused(make_client: ClientFactory) -> None:
    with pytest.raises(ConnectionFailed, match="cannot connect to 127.0.0.1") as caught:
        make_client(free_port()).call("echo", 1)
    assert not isinstance(caught.value, TLSVerificationError)


# --- Several servers -------------------------------------------------------


def shutting_down(data: Any) -> Callable[[ServerConnection], None]:
    """A handler that rejects each request with SHUTTING_DOWN and ``data``, then closes."""

    def handle(connection: ServerConnection) -> None:
        request = connection.read_message()
        if request is None:
            return
        error = {"code": SHUTTING_DOWN, "message": "Server shutting down", "data": data}
        connection.send_message({"jsonrpc": "2.0", "id": request["id"], "error": error})

    return handle


def echoing(name: str) -> Callable[[ServerConnection], None]:
    """A handler that replies ``[name, params]`` to every request until the client closes."""

    def handle(connection: ServerConnection) -> None:
        while (request := connection.read_message()) is not None:
            reply(connection, request, [name, request["params"]])

    return handle


def read_then_close(connection: ServerConnection) -> None:
    """A handler that reads one request and closes without a reply."""
    connection.read_message()


def test_failover_first_server_down(scripted: StartServer, make_client: ClientFactory) -> None:
    """With the first server not listening, the call goes to the next one."""
    second = scripted(echoing("second"))
    client = make_client(free_port(), failover=[("127.0.0.1", second.port)], random=lambda: 0.0)

    assert client.call("echo", 1) == ["second", [1]]
    assert client.server == f"127.0.0.1:{second.port}"
    assert client.stats.connections == 1


def test_failover_all_servers_down(make_client: ClientFactory) -> None:
    first, second = free_port(), free_port()
    client = make_client(first, failover=[("127.0.0.1", second)], random=lambda: 0.0)

    with pytest.raises(ConnectionFailed) as caught:
        client.call("echo", 1)
    assert f"127.0.0.1:{second}" in str(caught.value)


def test_failover_starting_server(scripted: StartServer, make_client: ClientFactory) -> None:
    """``random`` picks the first server, so that clients spread across the servers."""
    first, second = scripted(echoing("first")), scripted(echoing("second"))
    servers = {"failover": [("127.0.0.1", second.port)]}

    assert make_client(first.port, random=lambda: 0.0, **servers).call("echo", 1)[0] == "first"
    assert make_client(first.port, random=lambda: 0.99, **servers).call("echo", 1)[0] == "second"


def test_not_started_sent_elsewhere(scripted: StartServer, make_client: ClientFactory) -> None:
    """A call a draining server did not start is sent to the next server, idempotent or not."""
    draining = scripted(shutting_down(NOT_STARTED))
    second = scripted(echoing("second"))
    client = make_client(draining.port, failover=[("127.0.0.1", second.port)], random=lambda: 0.0)

    assert client.call("echo", "x") == ["second", ["x"]]
    assert client.stats.retried_calls == 1
    assert draining.accepted == 1


def test_stopped_call_not_resent(scripted: StartServer, make_client: ClientFactory) -> None:
    """A call the server stopped may have run: it is sent again only when idempotent."""
    stopping = scripted(shutting_down("the server is shutting down and stopped the call"))
    second = scripted(echoing("second"))
    options = {"failover": [("127.0.0.1", second.port)], "random": lambda: 0.0}

    with pytest.raises(RemoteError) as caught:
        make_client(stopping.port, **options).call("echo", "plain")
    idempotent = make_client(stopping.port, **options).call("echo", "again", idempotent=True)

    assert caught.value.code == SHUTTING_DOWN
    assert idempotent == ["second", ["again"]]


def test_lost_idempotent_call_resent(scripted: StartServer, make_client: ClientFactory) -> None:
    """After a lost connection an idempotent call is sent once more; others raise OutcomeUnknown."""
    lost = scripted(read_then_close)
    second = scripted(echoing("second"))
    options = {"failover": [("127.0.0.1", second.port)], "random": lambda: 0.0}
    idempotent_client = make_client(lost.port, **options)

    with pytest.raises(OutcomeUnknown):
        make_client(lost.port, **options).call("echo", "plain")
    assert idempotent_client.call("echo", "again", idempotent=True) == ["second", ["again"]]
    assert idempotent_client.stats.retried_calls == 1


def test_resent_once_only(scripted: StartServer, make_client: ClientFactory) -> None:
    """Two draining servers in a row: the second rejection reaches the caller."""
    first, second = scripted(shutting_down(NOT_STARTED)), scripted(shutting_down(NOT_STARTED))
    client = make_client(first.port, failover=[("127.0.0.1", second.port)], random=lambda: 0.0)

    with pytest.raises(RemoteError) as caught:
        client.call("echo", 1)
    assert caught.value.data == NOT_STARTED
    assert client.stats.retried_calls == 1


def test_failover_invalid_port(make_client: ClientFactory) -> None:
    with pytest.raises(ConfigurationError, match="port 0 is invalid"):
        make_client(free_port(), failover=[("127.0.0.1", 0)])
