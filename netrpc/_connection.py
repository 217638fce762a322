"""
One client connection: netstring frames in and out over a (TLS) transport.

The protocol only frames bytes and reports events to its owner, the
``Client``, which keeps every piece of call state. So a lost connection
loses nothing but the transport.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IHandshakeListener, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from netrpc.framing import FramingError, NetstringDecoder


class ConnectionOwner(TypingProtocol):
    """The receiver of a ``ClientProtocol``'s events: the client that owns the calls."""

    def connection_ready(self, connection: ClientProtocol) -> None:
        """Start sending calls: the TLS handshake is done and the server verified."""

    def frames_received(self, connection: ClientProtocol, frames: list[bytes]) -> None:
        """Handle whole netstring payloads, in the order they arrived."""

    def connection_lost(self, connection: ClientProtocol, reason: Failure) -> None:
        """Handle the end of ``connection``, before or after it became ready."""


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """
    Frames outgoing messages as netstrings and decodes incoming ones.

    The connection becomes ready once the server is verified. The ``mtls:``
    endpoint connects this protocol only after the TLS handshake, so that
    is at ``connectionMade``. Directly on Twisted's TLS layer it is at
    ``handshakeCompleted``, which Twisted calls only after the peer's
    certificate passed verification. On a transport without TLS, such as an
    in-memory one in tests, it is at ``connectionMade`` too.
    """

    # Set by makeConnection, before the owner learns of this protocol. The
    # methods below use the abortConnection of a TCP or TLS transport.
    transport: ITCPTransport

    def __init__(self, owner: ConnectionOwner, max_reply_size: int) -> None:
        self._owner = owner
        self._decoder = NetstringDecoder(max_reply_size)
        self.ready = False
        self.received_any = False
        # Why this side dropped the connection, when it did so on purpose.
        self.close_reason: Exception | None = None

    def connectionMade(self) -> None:
        # Calls are small and waited for, so Nagle's algorithm (RFC 896),
        # which holds a small segment back while an earlier one is
        # unacknowledged, would only add delay. Memory transports lack it.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._become_ready()

    def handshakeCompleted(self) -> None:
        self._become_ready()

    def _become_ready(self) -> None:
        # Behind the mtls: endpoint both events arrive, one after the other.
        if not self.ready:
            self.ready = True
            self._owner.connection_ready(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FramingError as error:
            if error.frames:
                self._owner.frames_received(self, error.frames)
            self.abort(error)
            return
        if frames:
            self.received_any = True
            self._owner.frames_received(self, frames)

    def send(self, frame: bytes) -> None:
        """Write one complete netstring frame."""
        self.transport.write(frame)

    def abort(self, reason: Exception) -> None:
        """Drop the connection at once, remembering ``reason`` for the owner."""
        if self.close_reason is None:
            self.close_reason = reason
        self.transport.abortConnection()

    def close(self) -> None:
        """Close the connection cleanly, after sending what is buffered."""
        self.transport.loseConnection()

    def peer(self) -> IAddress:
        """Return the address of the server at the other end."""
        return self.transport.getPeer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._owner.connection_lost(self, reason)


class ClientFactory(Factory):
    """Builds the one ``ClientProtocol`` of a connection attempt."""

    noisy = False

    def __init__(self, owner: ConnectionOwner, max_reply_size: int) -> None:
        self._owner = owner
        self._max_reply_size = max_reply_size

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        return ClientProtocol(self._owner, self._max_reply_size)

