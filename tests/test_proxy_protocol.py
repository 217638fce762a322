"""
The ``proxyProtocol`` option of the ``mtls:`` server endpoint: a PROXY
header (version 2 or 1) read before the TLS handshake, its address seen by
every layer above, and connections without a valid header rejected and
logged. Headers are packed here with ``struct``, as a load balancer sends them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from netrpc.certs import PKI
from netrpc.client import Server, connect
from netrpc.endpoints import EndpointDescriptionError, client_endpoint
from netrpc.exceptions import ConnectionFailed, TLSVerificationError
from netrpc.handshake import connect_tls
from netrpc.methods import build_registry
from netrpc.protocol import RPCServerFactory
from netrpc.verify import Reason

from tlstest import (
    EchoClient,
    LogCapture,
    client_description,
    connect_raw,
    echo_factory,
    server_description,
    with_timeout,
)

# The client addresses that the headers below claim. They come from the
# documentation ranges (RFC 5737, RFC 3849); no packet is sent to them.
CLIENT_V4 = ("203.0.113.7", 51000)
CLIENT_V6 = ("2001:db8::7", 51001)

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """Pack a PROXY v2 header for a TCP connection from ``source`` to ``destination``."""
    if ":" in source[0]:
        family, packed_family = socket.AF_INET6, 0x21
    else:
        family, packed_family = socket.AF_INET, 0x11
    addresses = (
        socket.inet_pton(family, source[0])
        + socket.inet_pton(family, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    # Version 2, command PROXY (0x21); then the family and TCP; then the length.
    return _V2_SIGNATURE + bytes([0x21, packed_family]) + struct.pack("!H", len(addresses)) + addresses


def v2_local_header() -> bytes:
    """Pack a PROXY v2 header with the LOCAL command, as a balancer's health check sends it."""
    return _V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def v2_unix_header(source: bytes, destination: bytes) -> bytes:
    """Pack a PROXY v2 header for a stream connection between two UNIX socket paths."""
    addresses = source.ljust(108, b"\0") + destination.ljust(108, b"\0")
    # Version 2, command PROXY (0x21); then AF_UNIX and stream (0x31); then the length.
    return _V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", len(addresses)) + addresses


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


# The pause between the two segments of a split prefix, in seconds.
SPLIT_PAUSE = 0.1


class _Prefixer(ProtocolWrapper):
    """
    Writes the factory's prefix, then lets the wrapped protocol (TLS) start.
    With the factory's ``split``, the prefix goes out in two TCP segments.
    """

    def makeConnection(self, transport: Any) -> None:
        split = self.factory.split
        if split is None:
            transport.write(self.factory.prefix)
            super().makeConnection(transport)
            return
        transport.setTcpNoDelay(True)
        transport.write(self.factory.prefix[:split])
        reactor.callLater(SPLIT_PAUSE, self._send_rest, transport, split)

    def _send_rest(self, transport: Any, split: int) -> None:
        transport.write(self.factory.prefix[split:])
        super().makeConnection(transport)


class _PrefixFactory(WrappingFactory):
    protocol = _Prefixer

    def __init__(self, wrapped: IProtocolFactory, prefix: bytes, split: int | None = None) -> None:
        super().__init__(wrapped)
        self.prefix = prefix
        self.split = split


@implementer(IStreamClientEndpoint)
class PrefixingEndpoint:
    """
    A TCP client endpoint to 127.0.0.1 that sends ``prefix`` before anything
    else; with ``split``, its first ``split`` bytes in a segment of their own.
    """

    def __init__(self, port: int, prefix: bytes, split: int | None = None) -> None:
        self.port = port
        self.prefix = prefix
        self.split = split

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        connecting = tcp.connect(_PrefixFactory(protocolFactory, self.prefix, self.split))
        return connecting.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IStreamClientEndpoint)
class ProxiedTLSEndpoint:
    """Mutual TLS as client ``name`` of ``pki``, after a PROXY header sent in clear."""

    def __init__(
        self, pki: PKI, port: int, prefix: bytes, name: str = "alice", split: int | None = None
    ) -> None:
        self.client_tls = client_endpoint(reactor, client_description(pki, name, port)).client_tls
        self.tcp = PrefixingEndpoint(port, prefix, split)
        self.server = f"127.0.0.1:{port}"

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return connect_tls(
            reactor, self.tcp, self.client_tls, protocolFactory, server=self.server, timeout=5
        )


@pytest.fixture
def tls_log() -> Iterator[LogCapture]:
    capture = LogCapture()
    capture.start()
    yield capture
    capture.stop()


@pytest.fixture
def proxied(pki: PKI) -> Iterator[dict[str, Any]]:
    """An echo server with ``proxyProtocol=true``; the dict contains endpoint, port and factory."""
    endpoint = serverFromString(reactor, server_description(pki, "proxyProtocol=true"))
    factory = echo_factory()
    listening = pytest_twisted.blockon(endpoint.listen(factory))
    yield {"endpoint": endpoint, "port": listening.getHost().port, "factory": factory}
    pytest_twisted.blockon(defer.maybeDeferred(listening.stopListening))


@pytest.fixture
def proxied_short(pki: PKI) -> Iterator[int]:
    """An echo server with ``proxyProtocol=true`` and a 1 s handshake timeout; yields its port."""
    description = server_description(pki, "proxyProtocol=true", "handshakeTimeout=1")
    endpoint = serverFromString(reactor, description)
    listening = pytest_twisted.blockon(endpoint.listen(echo_factory()))
    yield listening.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(listening.stopListening))


@pytest_twisted.inlineCallbacks
def echo_through(
    port: int, prefix: bytes, pki: PKI, name: str = "alice", split: int | None = None
) -> Any:
    """Connect with ``prefix`` before mutual TLS, echo once, close; return the reply."""
    endpoint = ProxiedTLSEndpoint(pki, port, prefix, name, split)
    client = yield with_timeout(endpoint.connect(Factory.forProtocol(EchoClient)))
    reply = yield client.echo(b"through the proxy")
    client.transport.loseConnection()
    yield with_timeout(client.closed)
    return reply


@pytest_twisted.inlineCallbacks
def rejected_through(port: int, prefix: bytes, pki: PKI, name: str = "alice") -> Any:
    """Connect as ``echo_through`` does and return the exception that ended the connection."""
    endpoint = ProxiedTLSEndpoint(pki, port, prefix, name)
    try:
        client = yield with_timeout(endpoint.connect(Factory.forProtocol(EchoClient)))
    except (TLSVerificationError, ConnectionFailed) as error:
        return error
    # With TLS 1.3 the client's handshake completes before the server has
    # checked the client certificate; the rejection then closes the connection.
    closed = yield with_timeout(client.closed)
    return closed


class TestOption:
    def test_parsed(self, pki: PKI) -> None:
        endpoint = serverFromString(reactor, server_description(pki, "proxyProtocol=true"))
        assert endpoint.proxy_protocol is True

    def test_off_by_default(self, pki: PKI) -> None:
        endpoint = serverFromString(reactor, server_description(pki))
        assert endpoint.proxy_protocol is False

    def test_invalid_value(self, pki: PKI) -> None:
        with pytest.raises(EndpointDescriptionError, match=r"invalid proxyProtocol='maybe'"):
            serverFromString(reactor, server_description(pki, "proxyProtocol=maybe"))


class TestHeaderAccepted:
    @pytest_twisted.inlineCallbacks
    def test_v2_address(self, pki: PKI, proxied: dict[str, Any]) -> Any:
        """After a v2 header and mutual TLS, the application sees the header's client address."""
        port = proxied["port"]
        reply = yield echo_through(port, v2_header(CLIENT_V4, ("127.0.0.1", port)), pki)

        server_side = proxied["factory"].connected[0]
        assert reply == b"through the proxy"
        assert server_side.transport.getPeer() == IPv4Address("TCP", *CLIENT_V4)
        assert server_side.transport.getHost() == IPv4Address("TCP", "127.0.0.1", port)
        assert server_side.peer_subject == "CN=alice"

    @pytest_twisted.inlineCallbacks
    def test_v2_ipv6_address(self, pki: PKI, proxied: dict[str, Any]) -> Any:
        port = proxied["port"]
        yield echo_through(port, v2_header(CLIENT_V6, ("2001:db8::1", port)), pki)

        peer = proxied["factory"].connected[0].transport.getPeer()
        assert peer == IPv6Address("TCP", *CLIENT_V6)

    @pytest_twisted.inlineCallbacks
    def test_v1_address(self, pki: PKI, proxied: dict[str, Any]) -> Any:
        port = proxied["port"]
        yield echo_through(port, v1_header(CLIENT_V4, ("127.0.0.1", port)), pki)

        peer = proxied["factory"].connected[0].transport.getPeer()
        assert peer == IPv4Address("TCP", *CLIENT_V4)

    @pytest_twisted.inlineCallbacks
    def test_local_command(self, pki: PKI, proxied: dict[str, Any]) -> Any:
        """A LOCAL header carries no address, so the peer is the balancer's own address."""
        yield echo_through(proxied["port"], v2_local_header(), pki)

        peer = proxied["factory"].connected[0].transport.getPeer()
        assert peer.host == "127.0.0.1"
        assert peer.port != CLIENT_V4[1]

    @pytest_twisted.inlineCallbacks
    def test_caller_address(self, pki: PKI) -> Any:
        """The RPC caller identity (``whoami``) carries the address from the header."""
        endpoint = serverFromString(reactor, server_description(pki, "proxyProtocol=true"))
        listening = yield endpoint.listen(RPCServerFactory(build_registry()))
        port = listening.getHost().port
        header = v2_header(CLIENT_V4, ("127.0.0.1", port))
        proxied_endpoint = ProxiedTLSEndpoint(pki, port, header)

        client = yield defer.ensureDeferred(_connect(proxied_endpoint))
        identity = yield client.call("whoami")
        yield client.close()
        yield listening.stopListening()

        assert identity["common_name"] == "alice"
        assert identity["address"] == "203.0.113.7:51000"

    @pytest_twisted.inlineCallbacks
    def test_rejected_handshake_logs_client(
        self, pki: PKI, proxied: dict[str, Any], tls_log: LogCapture
    ) -> Any:
        """A TLS rejection behind the proxy is logged with the real client's address."""
        port = proxied["port"]
        header = v2_header(CLIENT_V4, ("127.0.0.1", port))

        closed = yield rejected_through(port, header, pki, name="mallory")
        event = yield tls_log.wait_for_rejection(str(Reason.REVOKED))

        assert isinstance(closed, TLSVerificationError)
        assert event["peer"] == "203.0.113.7:51000"


async def _connect(endpoint: ProxiedTLSEndpoint) -> Any:
    return await connect(reactor, Server(endpoint, endpoint.server), timeout=5)


class TestHeaderRejected:
    @pytest_twisted.inlineCallbacks
    def test_tls_without_header(
        self, pki: PKI, proxied: dict[str, Any], tls_log: LogCapture
    ) -> Any:
        """A client that starts TLS at once, bypassing the balancer, is rejected and logged."""
        closed = yield rejected_through(proxied["port"], b"", pki)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_PROXY))

        assert isinstance(closed, ConnectionFailed)
        assert "expected a PROXY protocol header" in event["detail"]
        assert "\\x16\\x03" in event["detail"]
        assert event["peer"].startswith("127.0.0.1:")
        assert proxied["factory"].connected == []
        assert proxied["endpoint"].stats.rejections[str(Reason.NOT_PROXY)] == 1

    @pytest_twisted.inlineCallbacks
    def test_invalid_v2_header(self, proxied: dict[str, Any], tls_log: LogCapture) -> Any:
        """A v2 signature with an unknown version is rejected as an invalid header."""
        bad_version = _V2_SIGNATURE + bytes([0x31, 0x11]) + struct.pack("!H", 0)
        peer = yield connect_raw(proxied["port"], bad_version)

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_PROXY))

        assert "the PROXY header is invalid" in event["detail"]
        assert peer.received == b""
        assert len(tls_log.rejections()) == 1

    @pytest_twisted.inlineCallbacks
    def test_header_without_option(self, pki: PKI, tls_log: LogCapture) -> Any:
        """Without the option, a PROXY header is not a TLS client hello and is rejected."""
        endpoint = serverFromString(reactor, server_description(pki))
        factory = echo_factory()
        listening = yield endpoint.listen(factory)
        port = listening.getHost().port

        closed = yield rejected_through(port, v2_header(CLIENT_V4, ("127.0.0.1", port)), pki)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_TLS))
        yield listening.stopListening()

        assert isinstance(closed, ConnectionFailed)
        assert "QUIT" in event["detail"]
        assert factory.connected == []

    @pytest_twisted.inlineCallbacks
    def test_not_tls_after_header(self, proxied: dict[str, Any], tls_log: LogCapture) -> Any:
        """Bytes after a valid header still have to start a TLS handshake."""
        port = proxied["port"]
        greeting = v2_header(CLIENT_V4, ("127.0.0.1", port)) + b"GET / HTTP/1.1\r\n\r\n"
        peer = yield connect_raw(port, greeting)

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_TLS))

        assert event["peer"] == "203.0.113.7:51000"
        assert len(tls_log.rejections()) == 1

    @pytest_twisted.inlineCallbacks
    def test_connection_maximum(self, pki: PKI, tls_log: LogCapture) -> Any:
        """Beyond maxConnections of verified clients, a new connection is closed before its header."""
        description = server_description(pki, "proxyProtocol=true", "maxConnections=1")
        endpoint = serverFromString(reactor, description)
        listening = yield endpoint.listen(echo_factory())
        port = listening.getHost().port
        header = v2_header(CLIENT_V4, ("127.0.0.1", port))
        first = yield with_timeout(
            ProxiedTLSEndpoint(pki, port, header).connect(Factory.forProtocol(EchoClient))
        )
        yield first.echo(b"verified")

        second = yield connect_raw(port, v2_local_header())
        yield with_timeout(second.closed)
        reply = yield first.echo(b"still served")
        first.transport.loseConnection()
        yield with_timeout(first.closed)
        yield listening.stopListening()

        assert endpoint.stats.refused == 1
        assert reply == b"still served"


class TestHeaderSplit:
    @pytest.mark.parametrize("version", ["v1", "v2"])
    @pytest_twisted.inlineCallbacks
    def test_two_segments(self, pki: PKI, proxied: dict[str, Any], version: str) -> Any:
        """A header whose first segment is shorter than the bytes that tell its version is read."""
        port = proxied["port"]
        make = v1_header if version == "v1" else v2_header
        header = make(CLIENT_V4, ("127.0.0.1", port))

        reply = yield echo_through(port, header, pki, split=4)

        peer = proxied["factory"].connected[0].transport.getPeer()
        assert reply == b"through the proxy"
        assert peer == IPv4Address("TCP", *CLIENT_V4)

    @pytest_twisted.inlineCallbacks
    def test_short_non_header(self, proxied: dict[str, Any], tls_log: LogCapture) -> Any:
        """A few bytes that cannot start a header are rejected at once, without waiting for more."""
        peer = yield connect_raw(proxied["port"], b"GET")

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for_rejection(str(Reason.NOT_PROXY))

        assert "expected a PROXY protocol header" in event["detail"]
        assert "b'GET'" in event["detail"]

    @pytest_twisted.inlineCallbacks
    def test_incomplete_signature_times_out(
        self, proxied_short: int, tls_log: LogCapture
    ) -> Any:
        """The start of a signature and nothing more is closed by the handshake timeout."""
        peer = yield connect_raw(proxied_short, _V2_SIGNATURE[:6])

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for(lambda event: "reason" in event)

        assert event["reason"] == str(Reason.HANDSHAKE_TIMEOUT)


class TestHeaderAddresses:
    @pytest_twisted.inlineCallbacks
    def test_v1_unknown(self, pki: PKI, proxied: dict[str, Any]) -> Any:
        """The bare v1 UNKNOWN header is accepted, and the peer stays the balancer."""
        reply = yield echo_through(proxied["port"], b"PROXY UNKNOWN\r\n", pki)

        peer = proxied["factory"].connected[0].transport.getPeer()
        assert reply == b"through the proxy"
        assert peer.host == "127.0.0.1"

    @pytest_twisted.inlineCallbacks
    def test_v2_unix_source(self, pki: PKI) -> Any:
        """A v2 header for a UNIX socket keeps the balancer's address, as LOCAL does."""
        endpoint = serverFromString(reactor, server_description(pki, "proxyProtocol=true"))
        listening = yield endpoint.listen(RPCServerFactory(build_registry()))
        port = listening.getHost().port
        header = v2_unix_header(b"/run/balancer.sock", b"/run/netrpc.sock")
        try:
            client = yield defer.ensureDeferred(_connect(ProxiedTLSEndpoint(pki, port, header)))
            identity = yield client.call("whoami")
            yield client.close()
        finally:
            yield listening.stopListening()

        assert identity["address"].startswith("127.0.0.1:")

    @pytest.mark.parametrize(
        ("header", "problem"),
        [
            (b"PROXY TCP6 notanip ::1 1 2\r\n", "'notanip' is not an IPv6 address"),
            (b"PROXY TCP4 \x1b[31mFAKE 127.0.0.1 1 2\r\n", "is not an IPv4 address"),
            (b"PROXY TCP4 10.0.0.1\nforged 127.0.0.1 1 2\r\n", "is not an IPv4 address"),
            (b"PROXY TCP4 10.0.0.1 nothere 1 2\r\n", "'nothere' is not an IPv4 address"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "'::1' is not an IPv4 address"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "without a scope"),
            (b"PROXY TCP4 10.0.0.1 127.0.0.1 99999 2\r\n", "port 99999 is not between"),
            (b"PROXY TCP4 10.0.0.1 127.0.0.1 http 2\r\n", "port or address that is not valid"),
            (b"PROXY TCP4 \xff.0.0.1 127.0.0.1 1 2\r\n", "port or address that is not valid"),
        ],
    )
    @pytest_twisted.inlineCallbacks
    def test_v1_invalid(
        self, proxied: dict[str, Any], tls_log: LogCapture, header: bytes, problem: str
    ) -> Any:
        """A v1 header without a valid IP address and port is an invalid header."""
        peer = yield connect_raw(proxied["port"], header)

        yield with_timeout(peer.closed)
        event = yield tls_log.wait_for(lambda event: "reason" in event)

        assert event["reason"] == str(Reason.NOT_PROXY)
        assert problem in event["detail"]
        assert "\x1b" not in event["detail"]
        assert "\n" not in event["detail"]
        assert peer.received == b""
        assert proxied["factory"].connected == []
