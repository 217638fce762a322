"""
The PROXY protocol layer of a server endpoint, for daemons behind a TCP load
balancer such as HAProxy (``send-proxy-v2``).

The balancer opens its own connection to the daemon and sends one PROXY
header, version 2 (binary) or version 1 (text), before the client's bytes.
The header names the real client's address. With this layer, each accepted
connection runs through:

    TCP -> ProxyHeaderReader -> _ServerGuard -> TLS -> _HandshakeGate -> application

The header is read and removed before the TLS layer, so OpenSSL never sees
it. From then on ``getPeer()`` returns the client's address from the header
at every layer above, so the handshake log, the caller identity, the access
policy and the audit log all see the real client. A header with the LOCAL
command (HAProxy's own health checks) carries no address, and ``getPeer()``
stays the balancer's.

Parsing is Twisted's own (``twisted.protocols.haproxy``). Only the handling
of a connection without a valid header is added here: Twisted closes it
without a word, while netrpc logs it through the handshake guard, as for any
other rejected connection.

Anyone who can reach a port with this layer can claim any address in the
header, so such a port must be reachable by the balancer only.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IAddress

# NOTE: Twisted exports only proxyEndpoint() from twisted.protocols.haproxy.
# The wrapper classes it builds on are needed here to log rejected headers,
# and they live in a private module (Twisted 26.10).
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)

from netrpc.verify import Reason, Rejection

# The signature at the start of every version 2 header, and the word that
# starts a version 1 header (the PROXY protocol specification, sections 2.1
# and 2.2).
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_SIGNATURE = b"PROXY"


class ProxyHeaderReader(HAProxyProtocolWrapper):
    """
    Reads the PROXY header of one connection, then passes every later byte
    through. A connection whose header is missing or invalid is closed, and
    the guard it wraps logs why.
    """

    _first_bytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is None and not self._first_bytes:
            self._first_bytes = data[:16]
        super().dataReceived(data)

    def getPeer(self) -> IAddress:
        return _compressed(super().getPeer())

    def getHost(self) -> IAddress:
        return _compressed(super().getHost())

    def loseConnection(self) -> None:
        # Twisted's wrapper calls this when a header is missing or invalid;
        # the layers above may call it too, but only once a header has been
        # read, or for a handshake timeout, which they report themselves.
        if self._proxyInfo is None and self._first_bytes:
            self._report_invalid_header()
        super().loseConnection()

    def _report_invalid_header(self) -> None:
        first = self._first_bytes
        if first.startswith(_V2_SIGNATURE) or first.startswith(_V1_SIGNATURE):
            detail = f"the PROXY header is invalid; it starts with {first!r}"
        else:
            detail = (
                f"expected a PROXY protocol header, but the first bytes were {first!r}; "
                "this port accepts connections from the load balancer only"
            )
        reject = getattr(self.wrappedProtocol, "reject", None)
        if reject is not None:
            reject(Rejection(Reason.NOT_PROXY, detail))


def _compressed(address: IAddress) -> IAddress:
    # Twisted's v2 parser writes every group of an IPv6 address
    # (2001:db8:0:0:0:0:0:7); logs and policies expect the usual short form.
    if isinstance(address, IPv6Address):
        host = str(ipaddress.ip_address(address.host))
        return IPv6Address(address.type, host, address.port, address.flowInfo, address.scopeID)
    return address


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """Wraps each connection of ``wrappedFactory`` in a ``ProxyHeaderReader``."""

    # NOTE: HAProxyWrappingFactory is not generic over the protocol class it
    # builds (Twisted 26.10). mypy therefore rejects a subclass of that class
    # here, and this factory as the factory of one. The assignment and
    # arg-type ignores below are for that alone.
    protocol = ProxyHeaderReader  # type: ignore[assignment]
    noisy = False

    # Returning None refuses the connection, which Twisted allows but its
    # WrappingFactory annotation does not.
    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress | None
    ) -> HAProxyProtocolWrapper | None:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            # The guard refused the connection (connection maximum).
            return None
        return self.protocol(self, wrapped)  # type: ignore[arg-type]
