"""
Test your own services without certificates or sockets.

``MemoryServer`` runs the real server protocol on in-memory connections and
hands out clients connected to it::

    from netrpc.testing import MemoryServer

    @pytest_twisted.inlineCallbacks
    def test_add():
        server = MemoryServer(["mypackage.service"])
        client = yield server.connect_client()
        assert (yield client.call("add", 2, 3)) == 5
        yield client.close()

Every call goes through the same framing, envelope, registry and limits as
over TLS. Methods that ask for their caller get ``caller`` (by default
``TEST_CALLER``) in place of an identity from a client certificate.

Bytes move between the two ends on the next reactor turn, as over a real
connection. Pass a ``twisted.internet.task.Clock`` as ``reactor`` to drive
everything by hand with ``clock.advance(0)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from netrpc.identity import PeerIdentity
from netrpc.methods import MethodRegistry, build_registry
from netrpc.protocol import RPCServerFactory

__all__ = ["TEST_CALLER", "MemoryEndpoint", "MemoryServer"]

# The identity methods see as their caller unless a test passes another.
TEST_CALLER = PeerIdentity(
    common_name="test-client", dns_names=("test-client",), serial=1, address="memory"
)

# The port the in-memory server appears to listen on; clients get ports
# counting up from 40000.
SERVER_PORT = 8700
_client_ports = itertools.count(40000)


@implementer(ITransport, IConsumer, IPushProducer)
class _MemoryTransport:
    """
    One end of an in-memory connection. Written bytes reach the other end's
    protocol on a later reactor turn; ``pauseProducing`` buffers incoming
    bytes until ``resumeProducing``.
    """

    def __init__(self, clock: Any, host: IPv4Address, peer: IPv4Address) -> None:
        self.protocol: IProtocol | None = None
        self.other: _MemoryTransport | None = None
        self.producer: Any = None
        self.disconnecting = False
        self.disconnected = False
        self._clock = clock
        self._host = host
        self._peer = peer
        self._incoming: list[bytes] = []
        self._paused = False
        self._delivery_scheduled = False

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected or self.other is None:
            return
        self.other._receive(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close both ends once the other end has received every byte written."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self._clock.callLater(0, self._close, Failure(ConnectionDone()), True)

    def abortConnection(self) -> None:
        """Close both ends at once, dropping bytes not yet delivered."""
        if self.disconnected:
            return
        self.disconnecting = True
        self._clock.callLater(0, self._close, Failure(ConnectionLost()), False)

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    # IConsumer: the in-memory buffer never fills, so a producer is never paused.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered on this transport")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer: flow control of the bytes this end receives.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule_delivery()

    def stopProducing(self) -> None:
        self.loseConnection()

    # Delivery.

    def _receive(self, data: bytes) -> None:
        self._incoming.append(data)
        self._schedule_delivery()

    def _schedule_delivery(self) -> None:
        if self._incoming and not self._paused and not self._delivery_scheduled:
            self._delivery_scheduled = True
            self._clock.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._delivery_scheduled = False
        if self._paused or self.disconnected or not self._incoming:
            return
        data = b"".join(self._incoming)
        self._incoming.clear()
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def _close(self, reason: Failure, flush: bool) -> None:
        other = self.other
        assert other is not None
        if flush:
            # The other end reads what was sent before the close, as it would
            # from a socket, even when it had paused reading.
            other._paused = False
            other._deliver()
        for end in (self, other):
            if not end.disconnected:
                end.disconnected = True
                end.disconnecting = True
                assert end.protocol is not None
                end.protocol.connectionLost(reason)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    A client endpoint whose connections lead straight to a server factory's
    protocols, in memory.
    """

    server = f"memory:{SERVER_PORT}"

    def __init__(self, server_factory: IProtocolFactory, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._server_factory = server_factory
        self._reactor = reactor

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect a protocol of ``protocolFactory`` to a new server protocol.

        The Deferred fires with the client protocol at once. It fails with
        ``ConnectionRefusedError`` when the client factory builds no protocol.
        """
        server_address = IPv4Address("TCP", "127.0.0.1", SERVER_PORT)
        client_address = IPv4Address("TCP", "127.0.0.1", next(_client_ports))
        client = protocolFactory.buildProtocol(server_address)
        if client is None:
            return defer.fail(ConnectionRefusedError("the client factory built no protocol"))
        server = self._server_factory.buildProtocol(client_address)
        assert server is not None

        client_end = _MemoryTransport(self._reactor, client_address, server_address)
        server_end = _MemoryTransport(self._reactor, server_address, client_address)
        client_end.other, server_end.other = server_end, client_end
        client_end.protocol, server_end.protocol = client, server

        server.makeConnection(server_end)
        client.makeConnection(client_end)
        return defer.succeed(client)


class MemoryServer:
    """
    A server publishing ``services`` (``--methods`` values, or a ready
    ``MethodRegistry``; the demo service when empty), reachable in memory.

    ``limits`` are the keyword arguments of ``RPCServerFactory``, such as
    ``call_timeout`` or ``max_in_flight``. ``factory`` is the server factory,
    for tests that inspect its connections.
    """

    def __init__(
        self,
        services: Iterable[str] | MethodRegistry = (),
        *,
        caller: PeerIdentity | None = TEST_CALLER,
        reactor: Any = None,
        **limits: Any,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        registry = (
            services
            if isinstance(services, MethodRegistry)
            else build_registry(services, reactor=reactor)
        )
        self.factory = RPCServerFactory(
            registry, default_caller=caller, reactor=reactor, **limits
        )
        self.endpoint = MemoryEndpoint(self.factory, reactor)

    def connect_client(self, **options: Any) -> Deferred[Any]:
        """
        Connect a ``netrpc.client.Client`` to this server.

        ``options`` are the keyword arguments of ``netrpc.client.connect``.
        The Deferred fires with the connected client.
        """
        from netrpc.client import connect

        return connect(self.reactor, self.endpoint, **options)
