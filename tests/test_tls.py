"""
Mutual TLS over loopback: real handshakes between ``mtls:`` endpoints built
by ``serverFromString`` and ``clientFromString``, each passing case with its
failing twins.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from netrpc.certs import PKI, Usage, revoked_entry
from netrpc.framing import encode
from netrpc.exceptions import ConfigurationError, TLSVerificationError
from netrpc.tls import ServerTLS, build_server_context
from netrpc.tlsfiles import TLSFiles, load_material
from netrpc.verify import Reason, RejectionRecorder, Role

from tlstest import (
    EchoClient,
    HostileClientTLS,
    HostileServerTLS,
    LogCapture,
    client_description,
    connect_hostile,
    connect_raw,
    echo_factory,
    quote,
    server_description,
    with_timeout,
)


@pytest.fixture
def tls_log() -> Iterator[LogCapture]:
    capture = LogCapture()
    capture.start()
    yield capture
    capture.stop()


@pytest.fixture
def server(pki: PKI) -> Iterator[dict[str, Any]]:
    """A running mtls: echo server for ``pki``; the dict contains endpoint, port and factory."""
    endpoint = serverFromString(reactor, server_description(pki))
    factory = echo_factory()
    listening = pytest_twisted.blockon(endpoint.listen(factory))
    yield {"endpoint": endpoint, "port": listening.getHost().port, "factory": factory}
    pytest_twisted.blockon(defer.maybeDeferred(listening.stopListening))


def connect(pki: PKI, name: str, port: int, *extra: str) -> defer.Deferred[EchoClient]:
    endpoint = clientFromString(reactor, client_description(pki, name, port, *extra))
    return with_timeout(endpoint.connect(_client_factory()))


def _client_factory() -> Factory:
    return Factory.forProtocol(EchoClient)


def _write_pair(directory: Path, name: str, issued: Any) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    issued.write(cert, key)
    return cert, key


class TestMutualTLS:
    @pytest_twisted.inlineCallbacks
    def test_echo_round_trip(self, pki: PKI, server: dict[str, Any]) -> Any:
        """A client of the client CA gets its echo, and the server saw its certificate."""
        client = yield connect(pki, "alice", server["port"])

        reply = yield client.echo(b"hello")

        assert reply == b"hello"
        assert server["factory"].connected[0].peer_subject == "CN=alice"
        assert server["endpoint"].stats.completed == 1
        client.transport.loseConnection()
        yield with_timeout(client.closed)

    @pytest_twisted.inlineCallbacks
    def test_prefers_tls13(self, pki: PKI, server: dict[str, Any]) -> Any:
        client = yield connect(pki, "alice", server["port"])

        assert client.transport.getHandle().get_protocol_version_name() == "TLSv1.3"
        client.transport.loseConnection()
        yield with_timeout(client.closed)

    @pytest_twisted.inlineCallbacks
    def test_tls12_aead_accepted(self, pki: PKI, server: dict[str, Any]) -> Any:
        creator = HostileClientTLS(
            pki.client_cert("alice"), pki.client_key("alice"), max_version=SSL.TLS1_2_VERSION
        )
        client = yield connect_hostile(server["port"], creator)

        reply = yield client.echo(b"over 1.2")

        assert reply == b"over 1.2"
        assert "GCM" in client.transport.getHandle().get_cipher_name() or (
            "CHACHA20" in client.transport.getHandle().get_cipher_name()
        )
        client.transport.loseConnection()
        yield with_timeout(client.closed)


BAD_CLIENTS = [
    ("expired", Reason.EXPIRED),
    ("not_yet_valid", Reason.NOT_YET_VALID),
    ("self_signed", Reason.SELF_SIGNED),
    ("from_server_ca", Reason.UNKNOWN_CA),
    ("revoked", Reason.REVOKED),
]
TLS_VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]


class TestRejectedClients:
    @pytest.mark.parametrize("max_version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
    @pytest.mark.parametrize(("case", "reason"), BAD_CLIENTS, ids=[c for c, _ in BAD_CLIENTS])
    @pytest_twisted.inlineCallbacks
    def test_bad_certificate(
        self,
        pki: PKI,
        bad_client_certs: Any,
        server: dict[str, Any],
        tls_log: LogCapture,
        case: str,
        reason: Reason,
        max_version: int,
    ) -> Any:
        """A bad certificate is rejected and logged while bob keeps his connection."""
        bob = yield connect(pki, "bob", server["port"])
        pair = getattr(bad_client_certs, case)
        creator = HostileClientTLS(pair.cert, pair.key, max_version=max_version)

        intruder = yield connect_hostile(server["port"], creator)
        closed = yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(reason))

        assert isinstance(closed, SSL.Error)
        assert event["peer"].startswith("127.0.0.1:")
        assert event["subject"] == "CN=alice" or case == "revoked"
        assert event["issuer"] is not None
        assert server["endpoint"].stats.rejections[str(reason)] == 1
        assert [p.peer_subject for p in server["factory"].connected] == ["CN=bob"]
        reply = yield bob.echo(b"still here")
        assert reply == b"still here"
        bob.transport.loseConnection()

    @pytest.mark.parametrize("max_version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
    @pytest_twisted.inlineCallbacks
    def test_no_certificate(
        self, pki: PKI, server: dict[str, Any], tls_log: LogCapture, max_version: int
    ) -> Any:
        bob = yield connect(pki, "bob", server["port"])

        intruder = yield connect_hostile(server["port"], HostileClientTLS(max_version=max_version))
        yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.NO_CERTIFICATE))

        assert event["subject"] is None
        assert "no certificate" in event["certificate"]
        reply = yield bob.echo(b"still here")
        assert reply == b"still here"
        bob.transport.loseConnection()

    @pytest_twisted.inlineCallbacks
    def test_other_pki_client(
        self, pki: PKI, other_pki: PKI, server: dict[str, Any], tls_log: LogCapture
    ) -> Any:
        """Alice of an untrusted CA is rejected as unknown CA."""
        creator = HostileClientTLS(other_pki.client_cert("alice"), other_pki.client_key("alice"))

        intruder = yield connect_hostile(server["port"], creator)
        yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.UNKNOWN_CA))

        assert event["subject"] == "CN=alice"

    @pytest_twisted.inlineCallbacks
    def test_server_usage_certificate(
        self, pki: PKI, server: dict[str, Any], tls_log: LogCapture, tmp_path: Path
    ) -> Any:
        """A certificate of the client CA issued for serverAuth is the wrong key usage."""
        issued = pki.client_authority().issue("alice", usage=Usage.SERVER, names=["alice"])
        cert, key = _write_pair(tmp_path, "server-usage", issued)

        intruder = yield connect_hostile(server["port"], HostileClientTLS(cert, key))
        yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.WRONG_KEY_USAGE))

        assert "clientAuth" in event["detail"]

    @pytest_twisted.inlineCallbacks
    def test_tls11_rejected(self, pki: PKI, server: dict[str, Any], tls_log: LogCapture) -> Any:
        creator = HostileClientTLS(
            pki.client_cert("alice"),
            pki.client_key("alice"),
            max_version=SSL.TLS1_1_VERSION,
            ciphers=b"DEFAULT:@SECLEVEL=0",
        )

        intruder = yield connect_hostile(server["port"], creator)
        yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.HANDSHAKE_FAILED))

        assert "protocol" in event["detail"]

    @pytest_twisted.inlineCallbacks
    def test_cbc_cipher_rejected(self, pki: PKI, server: dict[str, Any], tls_log: LogCapture) -> Any:
        creator = HostileClientTLS(
            pki.client_cert("alice"),
            pki.client_key("alice"),
            max_version=SSL.TLS1_2_VERSION,
            ciphers=b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA",
        )

        intruder = yield connect_hostile(server["port"], creator)
        yield with_timeout(intruder.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.HANDSHAKE_FAILED))

        assert "cipher" in event["detail"]

    @pytest_twisted.inlineCallbacks
    def test_client_sees_rejection_reason(self, pki: PKI, server: dict[str, Any]) -> Any:
        """With TLS 1.3 the revoked client learns the reason on connectionLost."""
        client = yield connect(pki, "mallory", server["port"])

        reason = yield with_timeout(client.closed)

        assert isinstance(reason, TLSVerificationError)
        assert reason.reason == str(Reason.REVOKED)
        assert "rejected this client" in str(reason)


class TestServerVerification:
    """The client checks the server's chain, usage and name, and reports why it rejects it."""

    @pytest_twisted.inlineCallbacks
    def test_wrong_server_ca(self, pki: PKI, other_pki: PKI, server: dict[str, Any]) -> Any:
        description = client_description(pki, "alice", server["port"]).replace(
            f"caCerts={quote(pki.server_ca_cert)}", f"caCerts={quote(other_pki.server_ca_cert)}"
        )
        endpoint = clientFromString(reactor, description)

        with pytest.raises(TLSVerificationError) as caught:
            yield with_timeout(endpoint.connect(_client_factory()))

        assert caught.value.reason == str(Reason.UNKNOWN_CA)
        assert "not a trusted CA" in str(caught.value)

    @pytest_twisted.inlineCallbacks
    def test_name_mismatch(self, pki: PKI, server: dict[str, Any]) -> Any:
        with pytest.raises(TLSVerificationError) as caught:
            yield connect(pki, "alice", server["port"], "serverName=rpc.example.com")

        assert caught.value.reason == str(Reason.NAME_MISMATCH)
        assert "'rpc.example.com'" in str(caught.value)
        assert "localhost, 127.0.0.1" in str(caught.value)

    @pytest_twisted.inlineCallbacks
    def test_server_signed_by_client_ca(self, pki: PKI, tmp_path: Path) -> Any:
        issued = pki.client_authority().issue(
            "localhost", usage=Usage.SERVER, names=["localhost", "127.0.0.1"]
        )
        cert, key = _write_pair(tmp_path, "server", issued)
        description = (
            f"mtls:port=0:interface=127.0.0.1:privateKey={quote(key)}:certKey={quote(cert)}"
            f":caCerts={quote(pki.client_ca_cert)}"
        )
        listening = yield serverFromString(reactor, description).listen(echo_factory())
        try:
            with pytest.raises(TLSVerificationError) as caught:
                yield connect(pki, "alice", listening.getHost().port)
        finally:
            yield listening.stopListening()

        assert caught.value.reason == str(Reason.UNKNOWN_CA)

    @pytest.mark.parametrize(
        ("usage", "days", "reason"),
        [
            (Usage.CLIENT, (-1, 10), Reason.WRONG_KEY_USAGE),
            (Usage.SERVER, (-10, -1), Reason.EXPIRED),
            (Usage.SERVER, (1, 10), Reason.NOT_YET_VALID),
        ],
        ids=["client-usage", "expired", "not-yet-valid"],
    )
    @pytest_twisted.inlineCallbacks
    def test_bad_server_certificate(
        self, pki: PKI, tmp_path: Path, usage: Usage, days: tuple[int, int], reason: Reason
    ) -> Any:
        """A server certificate that netrpc's server would not load is still rejected."""
        now = datetime.datetime.now(datetime.timezone.utc)
        issued = pki.server_authority().issue(
            "localhost",
            usage=usage,
            names=["localhost", "127.0.0.1"],
            not_before=now + datetime.timedelta(days=days[0]),
            not_after=now + datetime.timedelta(days=days[1]),
        )
        cert, key = _write_pair(tmp_path, "server", issued)
        factory = TLSMemoryBIOFactory(HostileServerTLS(cert, key), False, echo_factory())
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        try:
            with pytest.raises(TLSVerificationError) as caught:
                yield connect(pki, "alice", listening.getHost().port)
        finally:
            yield listening.stopListening()

        assert caught.value.reason == str(reason)


class TestGuard:
    """Limits and logs applied before and around the handshake."""

    @pytest.mark.parametrize("greeting", [b"", b"\x16\x03\x01"], ids=["silent", "partial"])
    @pytest_twisted.inlineCallbacks
    def test_handshake_timeout(self, pki: PKI, tls_log: LogCapture, greeting: bytes) -> Any:
        endpoint = serverFromString(reactor, server_description(pki, "handshakeTimeout=0.2"))
        listening = yield endpoint.listen(echo_factory())

        peer = yield connect_raw(listening.getHost().port, greeting)
        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.HANDSHAKE_TIMEOUT))
        yield listening.stopListening()

        assert "0.2 s" in event["detail"]
        assert endpoint.stats.rejections[str(Reason.HANDSHAKE_TIMEOUT)] == 1

    @pytest_twisted.inlineCallbacks
    def test_not_tls(self, server: dict[str, Any], tls_log: LogCapture) -> Any:
        peer = yield connect_raw(server["port"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_TLS))

        assert "GET / HTTP" in event["detail"]
        assert peer.received == b""
        assert len(tls_log.rejections()) == 1

    @pytest_twisted.inlineCallbacks
    def test_max_connections(self, pki: PKI, tls_log: LogCapture) -> Any:
        endpoint = serverFromString(reactor, server_description(pki, "maxConnections=1"))
        listening = yield endpoint.listen(echo_factory())
        port = listening.getHost().port
        alice = yield connect(pki, "alice", port)
        # An echo proves the server finished alice's handshake too; until
        # then her connection could give way to the newcomer.
        yield alice.echo(b"handshake done")

        extra = yield connect_raw(port)
        yield with_timeout(extra.closed)
        event = yield tls_log.wait_for(lambda event: "maximum" in event)
        reply = yield alice.echo(b"first one")
        alice.transport.loseConnection()
        yield with_timeout(alice.closed)
        yield listening.stopListening()

        assert event["maximum"] == 1
        assert endpoint.stats.refused == 1
        assert reply == b"first one"


    @pytest_twisted.inlineCallbacks
    def test_pending_handshake_evicted(self, pki: PKI, tls_log: LogCapture) -> Any:
        """At the maximum, a silent peer gives way to a new client instead of locking it out."""
        endpoint = serverFromString(reactor, server_description(pki, "maxConnections=2"))
        listening = yield endpoint.listen(echo_factory())
        port = listening.getHost().port
        bob = yield connect(pki, "bob", port)
        yield bob.echo(b"handshake done")
        silent = yield connect_raw(port)

        alice = yield connect(pki, "alice", port)
        yield with_timeout(silent.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.EVICTED))
        alice_reply = yield alice.echo(b"let in")
        bob_reply = yield bob.echo(b"kept")
        for client in (alice, bob):
            client.transport.loseConnection()
            yield with_timeout(client.closed)
        yield listening.stopListening()

        assert alice_reply == b"let in"
        assert bob_reply == b"kept"
        assert "oldest connection still in its handshake" in event["detail"]
        assert endpoint.stats.refused == 0


class TestReload:
    """``ServerTLS.replace()`` changes what new handshakes use and nothing else."""

    @pytest_twisted.inlineCallbacks
    def test_new_certificate_for_new_connections(
        self, pki: PKI, server: dict[str, Any], tmp_path: Path
    ) -> Any:
        bob = yield connect(pki, "bob", server["port"])
        renewed = pki.server_authority().issue(
            "localhost", usage=Usage.SERVER, names=["localhost", "127.0.0.1"]
        )
        cert, key = _write_pair(tmp_path, "server", renewed)
        server_tls: ServerTLS = server["endpoint"].server_tls

        server_tls.replace(TLSFiles(key, cert, pki.client_ca_cert, pki.crl))
        alice = yield connect(pki, "alice", server["port"])

        served = alice.transport.getPeerCertificate().to_cryptography()
        assert served.serial_number == renewed.certificate.serial_number
        reply = yield bob.echo(b"old context")
        assert reply == b"old context"
        old = bob.transport.getPeerCertificate().to_cryptography()
        assert old.serial_number != renewed.certificate.serial_number
        for client in (alice, bob):
            client.transport.loseConnection()

    @pytest_twisted.inlineCallbacks
    def test_failed_replace_keeps_material(
        self, pki: PKI, server: dict[str, Any], tmp_path: Path
    ) -> Any:
        server_tls: ServerTLS = server["endpoint"].server_tls
        before = server_tls.material

        with pytest.raises(ConfigurationError, match="does not match"):
            server_tls.replace(
                TLSFiles(pki.client_key("alice"), pki.server_cert, pki.client_ca_cert, pki.crl)
            )
        alice = yield connect(pki, "alice", server["port"])

        assert server_tls.material is before
        alice.transport.loseConnection()

    @pytest_twisted.inlineCallbacks
    def test_new_crl_rejects_client(
        self, pki: PKI, server: dict[str, Any], tls_log: LogCapture, tmp_path: Path
    ) -> Any:
        """After a CRL that revokes bob is loaded, his new handshakes fail and check_peer reports it."""
        bob_cert = x509.load_pem_x509_certificate(pki.client_cert("bob").read_bytes())
        crl = pki.client_authority().sign_crl([revoked_entry(bob_cert.serial_number)], number=99)
        crl_path = tmp_path / "client-ca.crl"
        crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        server_tls: ServerTLS = server["endpoint"].server_tls
        assert server_tls.check_peer(bob_cert) is None

        server_tls.replace(TLSFiles(pki.server_key, pki.server_cert, pki.client_ca_cert, crl_path))
        bob = yield connect(pki, "bob", server["port"])
        reason = yield with_timeout(bob.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.REVOKED))

        rejection = server_tls.check_peer(bob_cert)
        assert rejection is not None
        assert rejection.reason is Reason.REVOKED
        assert isinstance(reason, TLSVerificationError)
        assert event["subject"] == "CN=bob"


class TestContext:
    def test_options(self, pki: PKI) -> None:
        """The server context disables compression, renegotiation and tickets."""
        files = TLSFiles(pki.server_key, pki.server_cert, pki.client_ca_cert, pki.crl)
        context = build_server_context(load_material(files, Role.SERVER), RejectionRecorder())

        options = context.set_options(0)

        assert options & SSL.OP_NO_COMPRESSION
        assert options & SSL.OP_NO_RENEGOTIATION
        assert options & SSL.OP_NO_TICKET
        assert context.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def session_after_echo(pki: PKI, port: int) -> tuple[str | None, ssl.SSLSession | None]:
    """Echo one frame over stdlib TLS 1.3; return the version and the session the client kept."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(pki.server_ca_cert)
    context.load_cert_chain(pki.client_cert("alice"), pki.client_key("alice"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(encode(b"ticket?"))
            # A TLS 1.3 server sends its tickets after the handshake, so
            # they have arrived once the echo has.
            assert tls.recv(100) == encode(b"ticket?")
            return tls.version(), tls.session


class TestSessionTickets:
    @pytest.mark.xfail(
        strict=True,
        reason="pyOpenSSL 26.4 exposes no SSL_CTX_set_num_tickets, so OpenSSL still sends "
        "TLS 1.3 tickets that resumption, which is off, never accepts",
    )
    @pytest_twisted.inlineCallbacks
    def test_no_tls13_ticket(self, pki: PKI, server: dict[str, Any]) -> Any:
        version, session = yield threads.deferToThread(session_after_echo, pki, server["port"])

        assert version == "TLSv1.3"
        assert session is None or not session.has_ticket
