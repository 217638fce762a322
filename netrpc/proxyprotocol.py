"""
The PROXY protocol layer of a server endpoint, for daemons behind a TCP load
balancer such as HAProxy (``send-proxy-v2``).

The balancer opens its own connection to the daemon and sends one PROXY
header, version 2 (binary) or version 1 (text), before the client's bytes.
The header names the real client's address. With this layer, each accepted
connection runs through:

    TCP -> ProxyHeaderReader -> _ServerGuard -> TLS -> _HandshakeGate -> application

The header is read and removed before the TLS layer, so OpenSSL never receives
it. From then on ``getPeer()`` returns the client's address from the header
at every layer above, so the handshake log, the caller identity, the access
policy and the audit log all see the real client. A header with the LOCAL
command (HAProxy's own health checks) carries no address, and ``getPeer()``
stays the balancer's.

Parsing is Twisted's own (``twisted.protocols.haproxy``). Added here:

- a connection without a valid header is logged through the handshake
  guard, as any other rejected connection, where Twisted closes it without
  a word;
- the addresses and ports are checked, since Twisted's version 1 parser
  takes any text, which would then reach the logs and the audit log;
- the first bytes are collected until the header version can be told,
  since Twisted expects 16 (or 8) of them in the first read;
- the bare ``PROXY UNKNOWN`` line of version 1 is accepted;
- a header for a UNIX socket keeps the balancer's address, as LOCAL does.

Anyone who can reach a port with this layer can claim any address in the
header, so such a port must be reachable by the balancer only.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

# NOTE: Twisted exports only proxyEndpoint() from twisted.protocols.haproxy.
# The wrapper, parser and result classes it builds on are needed here to
# log rejected headers and check the addresses, and they live in private
# modules (Twisted 26.10).
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
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

# Twisted's parsers pick the version from the first bytes: 16 for version 2
# (signature, version and length), 8 for version 1.
_V2_DECIDES = 16
_V1_DECIDES = 8

_MAX_PORT = 65535


class _V1Parser(V1Parser):
    """Twisted's version 1 parser, plus the bare ``PROXY UNKNOWN`` header."""

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        # The specification (section 2.1) allows UNKNOWN without addresses;
        # Twisted's parser expects a space after it.
        if line == b"PROXY UNKNOWN":
            return ProxyInfo(line, None, None)
        try:
            return super().parse(line)
        except ValueError:
            # Twisted's parser lets this through for a port that is not a
            # number or an address that is not UTF-8.
            raise ValueError(f"{line!r} has a port or address that is not valid") from None


class ProxyHeaderReader(HAProxyProtocolWrapper):
    """
    Reads the PROXY header of one connection, then passes every later byte
    through. A connection whose header is missing or invalid is closed, and
    the guard it wraps logs why.
    """

    # The bytes received before the header version is known.
    _pending = b""
    # The first bytes of the connection, for the log of a rejected header.
    _first_bytes = b""
    # Why the header is invalid, when netrpc's own checks found it.
    _problem = ""

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            data = self._pending + data
            if _undecided(data):
                # A balancer may split its header across TCP segments.
                self._pending = data
                return
            self._pending = b""
            self._first_bytes = data[:_V2_DECIDES]
            self._parser = _parser_for(data)
            if self._parser is None:
                self.loseConnection()
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            info, remaining = self._parser.feed(data)
            if info is None:
                return
            info = _checked(info)
        except InvalidProxyHeader:
            self.loseConnection()
            return
        except ValueError as error:
            # From _V1Parser or _checked.
            self._problem = str(error)
            self.loseConnection()
            return

        self._proxyInfo = info
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def loseConnection(self) -> None:
        # Called here when a header is missing or invalid. The layers above
        # call it only once a header has been read, or for a handshake
        # timeout, which they report themselves.
        if self._proxyInfo is None and self._first_bytes:
            self._report_invalid_header()
        super().loseConnection()

    def _report_invalid_header(self) -> None:
        first = self._first_bytes
        if first.startswith(_V2_SIGNATURE) or first.startswith(_V1_SIGNATURE):
            problem = f" ({self._problem})" if self._problem else ""
            detail = f"the PROXY header is invalid{problem}; it starts with {first!r}"
        else:
            detail = (
                f"expected a PROXY protocol header, but the first bytes were {first!r}; "
                "this port accepts connections from the load balancer only"
            )
        reject = getattr(self.wrappedProtocol, "reject", None)
        if reject is not None:
            reject(Rejection(Reason.NOT_PROXY, detail))


def _undecided(data: bytes) -> bool:
    """Return whether ``data`` is too short to tell the header version but could start a header."""
    if len(data) < _V2_DECIDES and _V2_SIGNATURE.startswith(data[: len(_V2_SIGNATURE)]):
        return True
    return len(data) < _V1_DECIDES and _V1_SIGNATURE.startswith(data[: len(_V1_SIGNATURE)])


def _parser_for(data: bytes) -> V1Parser | V2Parser | None:
    """Return the parser for the header that ``data`` starts, or None if it starts none."""
    if data.startswith(_V2_SIGNATURE) and data[len(_V2_SIGNATURE)] & 0xF0 == 0x20:
        return V2Parser()
    if data.startswith(_V1_SIGNATURE):
        return _V1Parser()
    return None


def _checked(info: ProxyInfo) -> ProxyInfo:
    """
    Return ``info`` with its addresses checked and written in their usual form.
    Raises ValueError for an address or port that the header cannot carry.
    """
    if isinstance(info.source, UNIXAddress):
        # A client on the balancer's own UNIX socket has no network address;
        # the connection keeps the balancer's, as for the LOCAL command.
        return ProxyInfo(info.header, None, None)
    return ProxyInfo(info.header, _checked_address(info.source), _checked_address(info.destination))


def _checked_address(address: IAddress | None) -> IAddress | None:
    if address is None:
        return None
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise ValueError(f"expected an IP address, got {address!r}")

    version = 4 if isinstance(address, IPv4Address) else 6
    try:
        host = ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(f"{address.host!r} is not an IPv{version} address") from None
    if host.version != version or getattr(host, "scope_id", None):
        raise ValueError(f"{address.host!r} is not an IPv{version} address without a scope")
    if not 0 <= address.port <= _MAX_PORT:
        raise ValueError(f"port {address.port!r} is not between 0 and {_MAX_PORT}")

    # Twisted's version 2 parser writes every group of an IPv6 address
    # (2001:db8:0:0:0:0:0:7); logs and policies expect the usual short form.
    if isinstance(address, IPv4Address):
        return IPv4Address(address.type, str(host), address.port)
    return IPv6Address(address.type, str(host), address.port)


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
