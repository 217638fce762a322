"""
The ``mtls:`` endpoints: mutual TLS servers and clients that Twisted builds
from endpoint strings, through ``serverFromString`` and ``clientFromString``
once the plugin in ``twisted/plugins/netrpc_endpoints.py`` is installed.

Server::

    mtls:port=8700:interface=127.0.0.1:privateKey=server.key:certKey=server.crt
        :caCerts=client-ca.crt[:crl=client-ca.crl][:passphraseFile=PATH]
        [:backlog=N][:reusePort=true][:handshakeTimeout=S][:maxConnections=N]
        [:proxyProtocol=true]

Instead of ``port``, ``fd=N`` adopts an inherited listening socket, and
``systemdIndex=N`` or ``systemdName=NAME`` adopt a socket passed by systemd
socket activation. Write an IPv6 interface with escaped colons:
``interface=\\:\\:1``. ``proxyProtocol=true`` expects a PROXY protocol
header (version 2 or 1) from a load balancer before the TLS handshake, and
rejects connections without one; see ``netrpc.proxyprotocol``.

Client::

    mtls:host=localhost:port=8700:privateKey=alice.key:certKey=alice.crt
        :caCerts=server-ca.crt[:serverName=NAME][:passphraseFile=PATH][:timeout=S]

The option names are camelCase, as in Twisted's own ``ssl:`` endpoints.
Code that has a passphrase in memory (from a prompt) calls
``server_endpoint()`` or ``client_endpoint()`` with ``passphrase=``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    HostnameEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    HandshakeLog,
    HandshakeStats,
    ServerGuardFactory,
    connect_tls,
)
from netrpc.proxyprotocol import ProxyHeaderFactory
from netrpc.tls import ClientTLS, ServerTLS
from netrpc.tlsfiles import TLSFiles, key_needs_passphrase, read_passphrase_file

PREFIX = "mtls"

DEFAULT_INTERFACE = "127.0.0.1"
# Twisted's default of 50 overflows in bursts far below max_connections.
DEFAULT_BACKLOG = 511
# Covers name resolution, the TCP connection and the TLS handshake each.
DEFAULT_CONNECT_TIMEOUT = 10.0

_SERVER_OPTIONS = (
    "port",
    "interface",
    "backlog",
    "reusePort",
    "fd",
    "systemdIndex",
    "systemdName",
    "privateKey",
    "certKey",
    "caCerts",
    "crl",
    "passphraseFile",
    "handshakeTimeout",
    "maxConnections",
    "proxyProtocol",
)
_SOCKET_SOURCES = ("port", "fd", "systemdIndex", "systemdName")
_PORT_ONLY_OPTIONS = ("interface", "backlog", "reusePort")
# The options that choose the listening socket; every other server option
# is about TLS and limits.
SOCKET_OPTIONS = _SOCKET_SOURCES + _PORT_ONLY_OPTIONS

_CLIENT_OPTIONS = (
    "host",
    "port",
    "privateKey",
    "certKey",
    "caCerts",
    "serverName",
    "passphraseFile",
    "timeout",
)


class EndpointDescriptionError(ConfigurationError, ValueError):
    """
    An ``mtls:`` endpoint description is invalid. It is a ``ValueError``
    too, as Twisted's own endpoint parsers raise.
    """


class _Options:
    """The name=value options of one endpoint description, checked one by one."""

    def __init__(self, options: Mapping[str, str], known: tuple[str, ...], kind: str) -> None:
        self._options = dict(options)
        self._kind = kind
        unknown = sorted(set(self._options) - set(known))
        if unknown:
            raise EndpointDescriptionError(
                f"unknown option {unknown[0]!r} in the {PREFIX}: {kind} endpoint; "
                f"the options are {', '.join(known)}"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._options

    def text(self, name: str, default: str | None = None) -> str | None:
        return self._options.get(name, default)

    def required(self, name: str, what: str) -> str:
        value = self._options.get(name)
        if not value:
            raise EndpointDescriptionError(
                f"the {PREFIX}: {self._kind} endpoint needs {name}=..., {what}"
            )
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        text = self._options.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= maximum:
            raise EndpointDescriptionError(
                f"invalid {name}={text!r}: expected a whole number from {minimum} to {maximum}"
            )
        return value

    def seconds(self, name: str, default: float) -> float:
        text = self._options.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise EndpointDescriptionError(
                f"invalid {name}={text!r}: expected a number of seconds greater than 0"
            )
        return value

    def boolean(self, name: str) -> bool:
        text = self._options.get(name, "false").lower()
        if text not in ("true", "false", "yes", "no", "1", "0"):
            raise EndpointDescriptionError(f"invalid {name}={text!r}: expected true or false")
        return text in ("true", "yes", "1")


def split_description(description: str) -> tuple[str, dict[str, str]]:
    """
    Split an endpoint description into its prefix and its options, with
    Twisted's quoting: ``\\`` takes the next character literally, so
    ``interface=\\:\\:1`` is the IPv6 address ``::1``.
    """
    fields: list[str] = []
    current: list[str] = []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current.append(next(characters, ""))
        elif character == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(character)
    fields.append("".join(current))

    prefix, *arguments = fields
    options: dict[str, str] = {}
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if not equals:
            _reject_positional(argument)
        options[name] = value
    return prefix, options


def _reject_positional(argument: object) -> None:
    raise EndpointDescriptionError(
        f"invalid {PREFIX}: endpoint argument {argument!r}: write each option as name=value"
    )


def _tls_files(options: _Options, passphrase: bytes | None, crl: bool) -> TLSFiles:
    private_key = Path(options.required("privateKey", "the path of the private key file"))
    certificate = Path(options.required("certKey", "the path of the certificate file"))
    ca_certificates = Path(
        options.required("caCerts", "the path of the CA certificate that signs the peers")
    )
    crl_text = options.text("crl") if crl else None

    passphrase_file = options.text("passphraseFile")
    if passphrase is None and passphrase_file:
        passphrase = read_passphrase_file(Path(passphrase_file))
    if passphrase is None and key_needs_passphrase(private_key):
        raise PassphraseError(
            f"private key {str(private_key)!r} is encrypted; add passphraseFile=PATH "
            "naming a file (mode 0600) that holds its passphrase"
        )
    return TLSFiles(
        private_key,
        certificate,
        ca_certificates,
        Path(crl_text) if crl_text else None,
        passphrase,
    )


@implementer(IStreamServerEndpoint)
class MutualTLSServerEndpoint:
    """
    A server endpoint that wraps every connection of ``listen_endpoint`` in
    mutual TLS with ``server_tls``.

    The daemon reloads certificates through ``server_tls.replace()``;
    ``stats`` counts completed and rejected handshakes and refused
    connections. With ``proxy_protocol``, each connection must start with a
    PROXY header, read before the TLS handshake.
    """

    def __init__(
        self,
        reactor: Any,
        listen_endpoint: IStreamServerEndpoint,
        server_tls: ServerTLS,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_log: HandshakeLog | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        self._reactor = reactor
        self.listen_endpoint = listen_endpoint
        self.server_tls = server_tls
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.handshake_log = handshake_log or HandshakeLog(reactor)
        self.proxy_protocol = proxy_protocol

    @property
    def stats(self) -> HandshakeStats:
        """The handshake counters of every port this endpoint listens on."""
        return self.handshake_log.stats

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        """
        Listen with ``protocolFactory`` behind mutual TLS.

        Return a ``Deferred[IListeningPort]`` that fails with
        ``CannotListenError`` when the address is in use. Protocols built by
        the factory are connected only after a successful handshake.
        """
        guard = ServerGuardFactory(
            protocolFactory,
            self.server_tls,
            clock=self._reactor,
            handshake_log=self.handshake_log,
            handshake_timeout=self.handshake_timeout,
            max_connections=self.max_connections,
        )
        if self.proxy_protocol:
            return self.listen_endpoint.listen(ProxyHeaderFactory(guard))
        return self.listen_endpoint.listen(guard)


@implementer(IStreamServerEndpoint)
class ReusePortServerEndpoint:
    """
    A TCP server endpoint whose socket has SO_REUSEPORT set, so that several
    worker processes can listen on one port and the kernel spreads new
    connections among them.
    """

    def __init__(self, reactor: Any, port: int, *, interface: str, backlog: int) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        """Bind, listen and hand the socket to the reactor; fail with ``CannotListenError``."""
        try:
            listener = open_listening_socket(
                self.interface, self.port, self.backlog, reuse_port=True
            )
        except OSError as error:
            return defer.fail(CannotListenError(self.interface, self.port, error))
        try:
            # adoptStreamPort duplicates the descriptor, so ours is closed below.
            port = self._reactor.adoptStreamPort(
                listener.fileno(), listener.family, protocolFactory
            )
        except OSError as error:
            return defer.fail(CannotListenError(self.interface, self.port, error))
        finally:
            listener.close()
        return defer.succeed(port)


def open_listening_socket(
    interface: str, port: int, backlog: int, *, reuse_port: bool = False
) -> socket.socket:
    """
    Bind a non-blocking TCP socket to ``interface``:``port`` and listen on it.

    With ``reuse_port``, SO_REUSEPORT lets other sockets bind the same port.
    Raises ``OSError`` when the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((interface, port))
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def listening_socket_for(reactor: Any, options: Mapping[str, str]) -> socket.socket:
    """
    Return the listening socket that the options of an ``mtls:`` server
    description name, for a process that hands it to worker processes.

    With ``port=``, the socket is bound now and ``OSError`` is raised when
    that fails. With ``fd=``, ``systemdIndex=`` or ``systemdName=``, the
    inherited socket is returned. Invalid options raise
    ``EndpointDescriptionError``.
    """
    checked = _Options(options, _SERVER_OPTIONS, "server")
    endpoint = _listen_endpoint(reactor, checked)
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        return socket.socket(fileno=endpoint.fileno)

    port = checked.integer("port", 0, 0, 65535)
    interface = _interface(checked.text("interface", DEFAULT_INTERFACE) or DEFAULT_INTERFACE)
    backlog = checked.integer("backlog", DEFAULT_BACKLOG, 1, 65535)
    return open_listening_socket(
        interface, port, backlog, reuse_port=checked.boolean("reusePort")
    )


def _listen_endpoint(reactor: Any, options: _Options) -> IStreamServerEndpoint:
    sources = [name for name in _SOCKET_SOURCES if name in options]
    if len(sources) != 1:
        raise EndpointDescriptionError(
            f"the {PREFIX}: server endpoint needs exactly one of "
            f"{', '.join(_SOCKET_SOURCES)}; it got {', '.join(sources) or 'none'}"
        )
    if sources[0] != "port":
        for name in _PORT_ONLY_OPTIONS:
            if name in options:
                raise EndpointDescriptionError(
                    f"{name}= works only with port=, not with {sources[0]}=; remove one of them"
                )
        return _adopted_endpoint(reactor, options, sources[0])

    port = options.integer("port", 0, 0, 65535)
    interface = _interface(options.text("interface", DEFAULT_INTERFACE) or DEFAULT_INTERFACE)
    backlog = options.integer("backlog", DEFAULT_BACKLOG, 1, 65535)
    if options.boolean("reusePort"):
        return ReusePortServerEndpoint(reactor, port, interface=interface, backlog=backlog)
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, backlog, interface)
    return TCP4ServerEndpoint(reactor, port, backlog, interface)


def _interface(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise EndpointDescriptionError(
            f"invalid interface={text!r}: expected an IP address such as 127.0.0.1, "
            "0.0.0.0 or \\:\\:1 (escape the colons of an IPv6 address)"
        ) from None


def _adopted_endpoint(reactor: Any, options: _Options, source: str) -> IStreamServerEndpoint:
    if source == "fd":
        descriptor = options.integer("fd", 0, 0, 2**31 - 1)
    else:
        descriptor = _systemd_descriptor(reactor, options, source)
    return AdoptedStreamServerEndpoint(reactor, descriptor, _listening_family(descriptor))


def _systemd_descriptor(reactor: Any, options: _Options, source: str) -> int:
    # Twisted reads LISTEN_FDS and LISTEN_PID once, when its endpoints
    # module is imported, and removes them from the environment; its own
    # systemd: endpoint is the public way to reach what it read.
    if source == "systemdIndex":
        index = options.integer("systemdIndex", 0, 0, 2**16)
        lookup = f"systemd:domain=INET:index={index}"
        missing = f"systemd passed no socket at systemdIndex={index}"
    else:
        name = options.required("systemdName", "the FileDescriptorName= of the socket")
        lookup = f"systemd:domain=INET:name={quoteStringArgument(name)}"
        missing = f"systemd passed no socket named {name!r}"

    try:
        inherited = serverFromString(reactor, lookup)
    except (IndexError, KeyError):
        raise EndpointDescriptionError(
            f"{missing}; check the socket unit and that the daemon runs under "
            "systemd socket activation (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)"
        ) from None
    descriptor: int = inherited.fileno
    return descriptor


def _listening_family(descriptor: int) -> int:
    try:
        probe = socket.socket(fileno=descriptor)
    except OSError as error:
        raise EndpointDescriptionError(
            f"file descriptor {descriptor} is not an open socket ({error.strerror}); "
            "pass the number of an inherited listening socket"
        ) from None
    try:
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        family, kind = probe.family, probe.type
    finally:
        probe.detach()
    if kind != socket.SOCK_STREAM or not listening:
        raise EndpointDescriptionError(
            f"file descriptor {descriptor} is not a listening stream socket; "
            "pass a socket on which listen() was called"
        )
    return int(family)


def server_endpoint_from_options(
    reactor: Any, options: Mapping[str, str], *, passphrase: bytes | None = None
) -> MutualTLSServerEndpoint:
    """
    Build a server endpoint from the options of an ``mtls:`` description.

    The TLS files are read and checked now, so every problem raises
    ``ConfigurationError`` here rather than on the first connection.
    ``passphrase`` unlocks the private key in place of ``passphraseFile``.
    """
    checked = _Options(options, _SERVER_OPTIONS, "server")
    listen_endpoint = _listen_endpoint(reactor, checked)
    handshake_timeout = checked.seconds("handshakeTimeout", DEFAULT_HANDSHAKE_TIMEOUT)
    max_connections = checked.integer("maxConnections", DEFAULT_MAX_CONNECTIONS, 1, 10**6)
    proxy_protocol = checked.boolean("proxyProtocol")
    server_tls = ServerTLS(_tls_files(checked, passphrase, crl=True))
    return MutualTLSServerEndpoint(
        reactor,
        listen_endpoint,
        server_tls,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        proxy_protocol=proxy_protocol,
    )


def server_endpoint(
    reactor: Any, description: str, *, passphrase: bytes | None = None
) -> MutualTLSServerEndpoint:
    """Build a server endpoint from an ``mtls:`` description string."""
    return server_endpoint_from_options(
        reactor, _options_of(description), passphrase=passphrase
    )


def _options_of(description: str) -> dict[str, str]:
    prefix, options = split_description(description)
    if prefix != PREFIX:
        raise EndpointDescriptionError(
            f"endpoint {description!r} is not an {PREFIX}: endpoint; start it with '{PREFIX}:'"
        )
    return options


@implementer(IStreamClientEndpoint)
class MutualTLSClientEndpoint:
    """
    A client endpoint that connects to ``host``:``port`` in mutual TLS with
    ``client_tls``, which checks the server's name.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        client_tls: ClientTLS,
        *,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.client_tls = client_tls
        self.timeout = timeout

    @property
    def server(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6), as error messages name the server."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        """
        Connect and complete the TLS handshake.

        Return a ``Deferred[IProtocol]`` firing with the connected protocol
        once the server is verified. It fails with ``TLSVerificationError``
        when the server's certificate is rejected (unknown CA, name mismatch,
        expired, ...) and with ``ConnectionFailed`` when the connection or
        the handshake fails or exceeds ``timeout``.
        """
        tcp = HostnameEndpoint(self._reactor, self.host, self.port, timeout=self.timeout)
        return connect_tls(
            self._reactor,
            tcp,
            self.client_tls,
            protocolFactory,
            server=self.server,
            timeout=self.timeout,
        )


def client_endpoint_from_options(
    reactor: Any, options: Mapping[str, str], *, passphrase: bytes | None = None
) -> MutualTLSClientEndpoint:
    """Build a client endpoint from the options of an ``mtls:`` description."""
    checked = _Options(options, _CLIENT_OPTIONS, "client")
    host = checked.required("host", "the server's host name or IP address")
    checked.required("port", "the server's TCP port")
    port = checked.integer("port", 0, 1, 65535)
    server_name = checked.text("serverName") or host
    timeout = checked.seconds("timeout", DEFAULT_CONNECT_TIMEOUT)
    client_tls = ClientTLS(_tls_files(checked, passphrase, crl=False), server_name)
    return MutualTLSClientEndpoint(reactor, host, port, client_tls, timeout=timeout)


def client_endpoint(
    reactor: Any, description: str, *, passphrase: bytes | None = None
) -> MutualTLSClientEndpoint:
    """Build a client endpoint from an ``mtls:`` description string."""
    return client_endpoint_from_options(
        reactor, _options_of(description), passphrase=passphrase
    )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """The ``mtls:`` server endpoint parser that Twisted finds as a plugin."""

    prefix = PREFIX

    def parseStreamServer(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> MutualTLSServerEndpoint:
        """Build the endpoint; positional arguments are not accepted."""
        for argument in args:
            _reject_positional(argument)
        # Twisted's description parser passes every option as a string.
        return server_endpoint_from_options(reactor, cast(Mapping[str, str], kwargs))


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class MutualTLSClientParser:
    """The ``mtls:`` client endpoint parser that Twisted finds as a plugin."""

    prefix = PREFIX

    def parseStreamClient(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> MutualTLSClientEndpoint:
        """Build the endpoint; positional arguments are not accepted."""
        for argument in args:
            _reject_positional(argument)
        # Twisted's description parser passes every option as a string.
        return client_endpoint_from_options(reactor, cast(Mapping[str, str], kwargs))
