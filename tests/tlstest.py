"""
Helpers for TLS tests: a netstring echo service, hostile TLS peers that
present any certificate and check nothing, and a capture of the
``netrpc.tls`` log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    quoteStringArgument,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from netrpc.certs import PKI
from netrpc.handshake import LOG_NAMESPACE

# Upper bound for waiting on anything in a loopback test, in seconds.
WAIT = 10.0


class EchoServer(NetstringReceiver):
    """Sends every netstring back; stores the peer certificate seen at connectionMade."""

    peer_subject: str | None = None

    def connectionMade(self) -> None:
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            self.peer_subject = certificate.to_cryptography().subject.rfc4514_string()
        self.factory.connected.append(self)

    def stringReceived(self, string: bytes) -> None:
        self.sendString(string)


def echo_factory() -> Factory:
    """Return a factory of ``EchoServer``; its ``connected`` lists the connected protocols."""
    factory = Factory.forProtocol(EchoServer)
    factory.connected = []  # type: ignore[attr-defined]
    return factory


class EchoClient(NetstringReceiver):
    """Sends netstrings and queues the replies; ``closed`` fires with the exception that ended it."""

    def __init__(self) -> None:
        self.replies: defer.DeferredQueue[bytes] = defer.DeferredQueue()
        self.closed: defer.Deferred[BaseException] = defer.Deferred()

    def stringReceived(self, string: bytes) -> None:
        self.replies.put(string)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(reason.value)

    def echo(self, data: bytes) -> defer.Deferred[bytes]:
        """Send ``data`` and return a Deferred firing with the reply."""
        self.sendString(data)
        return with_timeout(self.replies.get())


class RawClient(Protocol):
    """A plain TCP peer: sends ``greeting`` once connected, records the end."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = b""
        self.closed: defer.Deferred[BaseException] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(reason.value)


def with_timeout(deferred: defer.Deferred[Any], seconds: float = WAIT) -> defer.Deferred[Any]:
    """Fail ``deferred`` with ``defer.TimeoutError`` unless it fires within ``seconds``."""
    return deferred.addTimeout(seconds, reactor)


def _load_pair(cert: Path, key: Path) -> tuple[x509.Certificate, Any]:
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    private_key = serialization.load_pem_private_key(key.read_bytes(), None)
    return certificate, private_key


def _raw_context(
    cert: Path | None,
    key: Path | None,
    max_version: int | None,
    ciphers: bytes | None,
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        context.set_max_proto_version(max_version)
        context.set_min_proto_version(min(max_version, SSL.TLS1_VERSION))
    if ciphers is not None:
        context.set_cipher_list(ciphers)
    if cert is not None and key is not None:
        certificate, private_key = _load_pair(cert, key)
        context.use_certificate(certificate)
        context.use_privatekey(private_key)
    context.set_verify(SSL.VERIFY_NONE)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class HostileClientTLS:
    """A TLS client that presents any certificate (or none) and verifies nothing."""

    def __init__(
        self,
        cert: Path | None = None,
        key: Path | None = None,
        *,
        max_version: int | None = None,
        ciphers: bytes | None = None,
    ) -> None:
        self._context = _raw_context(cert, key, max_version, ciphers)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLServerConnectionCreator)
class HostileServerTLS:
    """A TLS server that presents any certificate and requests no client certificate."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._context = _raw_context(cert, key, None, None)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def connect_hostile(port: int, creator: Any) -> defer.Deferred[EchoClient]:
    """Connect an ``EchoClient`` to 127.0.0.1:``port`` through ``creator``'s TLS."""
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return with_timeout(connectProtocol(endpoint, EchoClient()))


def connect_raw(port: int, greeting: bytes = b"") -> defer.Deferred[RawClient]:
    """Open a plain TCP connection to 127.0.0.1:``port`` and send ``greeting``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return with_timeout(connectProtocol(endpoint, RawClient(greeting)))


def quote(path: Path | str) -> str:
    """Quote ``path`` for an endpoint description."""
    return quoteStringArgument(str(path))


def server_description(pki: PKI, *extra: str, crl: bool = True) -> str:
    """Return an ``mtls:`` server description on 127.0.0.1, port 0, for ``pki``."""
    parts = [
        "mtls:port=0:interface=127.0.0.1",
        f"privateKey={quote(pki.server_key)}",
        f"certKey={quote(pki.server_cert)}",
        f"caCerts={quote(pki.client_ca_cert)}",
    ]
    if crl:
        parts.append(f"crl={quote(pki.crl)}")
    return ":".join([*parts, *extra])


def client_description(
    pki: PKI, name: str, port: int, *extra: str, host: str = "127.0.0.1"
) -> str:
    """Return an ``mtls:`` client description for client ``name`` of ``pki``."""
    parts = [
        f"mtls:host={quote(host)}:port={port}",
        f"privateKey={quote(pki.client_key(name))}",
        f"certKey={quote(pki.client_cert(name))}",
        f"caCerts={quote(pki.server_ca_cert)}",
    ]
    return ":".join([*parts, *extra])


@implementer(ILogObserver)
class LogCapture:
    """The events of the ``netrpc.tls`` log namespace, with a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self._waiters: list[tuple[Callable[[LogEvent], bool], defer.Deferred[LogEvent]]] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") != LOG_NAMESPACE:
            return
        self.events.append(event)
        for waiter in list(self._waiters):
            predicate, deferred = waiter
            if predicate(event):
                self._waiters.remove(waiter)
                deferred.callback(event)

    def rejections(self, reason: str | None = None) -> list[LogEvent]:
        """Return the rejected-handshake events, only those for ``reason`` if given."""
        found = [event for event in self.events if "reason" in event]
        if reason is not None:
            found = [event for event in found if event["reason"] == reason]
        return found

    def wait_for(self, predicate: Callable[[LogEvent], bool]) -> defer.Deferred[LogEvent]:
        """Return a Deferred firing with the first event, past or future, matching ``predicate``."""
        for event in self.events:
            if predicate(event):
                return defer.succeed(event)
        deferred: defer.Deferred[LogEvent] = defer.Deferred()
        self._waiters.append((predicate, deferred))
        return with_timeout(deferred)

    def wait_for_rejection(self, reason: str) -> defer.Deferred[LogEvent]:
        """Return a Deferred firing with the first rejection logged for ``reason``."""
        return self.wait_for(lambda event: event.get("reason") == reason)

    def start(self) -> None:
        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)
