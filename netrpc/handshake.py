"""
Twisted wrappers that watch the TLS handshake of each connection.

On a server, each accepted connection runs through three layers:

    TCP -> _ServerGuard -> TLSMemoryBIOProtocol -> _HandshakeGate -> application

(With the ``proxyProtocol`` endpoint option, ``netrpc.proxyprotocol`` adds
a layer between TCP and ``_ServerGuard`` that reads the PROXY header.)

- ``_ServerGuard`` receives the raw bytes. It closes connections beyond the
  maximum at once, cuts off a handshake that takes too long, closes a peer
  whose first byte cannot start a TLS record, and logs every rejected
  handshake with its reason, rate-limited per address.
- ``_HandshakeGate`` connects the application protocol only once the
  handshake has completed, so ``connectionMade`` always sees a verified
  peer and a rejected peer never reaches the application.

A client uses the same gate: ``connect_tls`` returns a Deferred that fires
with the application protocol after the handshake, or fails with
``TLSVerificationError`` or ``ConnectionFailed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol as BaseProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from netrpc._plural import plural
from netrpc.exceptions import ConnectionFailed, TLSVerificationError
from netrpc.tls import ClientTLS, ServerTLS
from netrpc.verify import Reason, Rejection, reject_ssl_error, rejected_by_peer

# Defaults for a server endpoint. A real client finishes its handshake in
# milliseconds; ten seconds leaves room for a slow network, not for a peer
# holding sockets open. The connection maximum stays below the common
# per-process limit of 1024 open files.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1000

# Log at most this many rejections per peer address in each window; the
# rest are counted and reported in one line when the window ends.
LOG_BURST = 5
LOG_WINDOW = 60.0
# Beyond this many addresses in one window, the rest share one log budget,
# so that a flood from many addresses cannot grow the limiter's memory.
MAX_TRACKED_ADDRESSES = 10_000
LOG_NAMESPACE = "netrpc.tls"
_OTHER_ADDRESSES = "other addresses"

# The first byte of every TLS record that opens a handshake (RFC 8446,
# section 5.1: ContentType handshake).
_TLS_HANDSHAKE_RECORD = 0x16


def describe_address(address: IAddress | None) -> str:
    """Return ``host:port`` for an IP address (``[host]:port`` for IPv6)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass
class _Window:
    end: float
    count: int = 0
    suppressed: int = 0
    call: IDelayedCall | None = None


class RepeatLimiter:
    """
    Allow at most ``burst`` events per key in each window of ``window``
    seconds. Events beyond that are counted, and ``report(key, count)`` is
    called once when their window ends.
    """

    def __init__(
        self,
        clock: IReactorTime,
        report: Callable[[str, int], None],
        *,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        max_keys: int = MAX_TRACKED_ADDRESSES,
    ) -> None:
        self._clock = clock
        self._report = report
        self.burst = burst
        self.window = window
        self._max_keys = max_keys
        self._windows: dict[str, _Window] = {}

    def allow(self, key: str) -> bool:
        """Count an event for ``key`` and tell whether it may be logged."""
        now = self._clock.seconds()
        key = self._tracked_key(key, now)
        current = self._windows.get(key)
        if current is None:
            current = self._windows[key] = _Window(end=now + self.window)
        if current.count < self.burst:
            current.count += 1
            return True

        current.suppressed += 1
        if current.call is None:
            current.call = self._clock.callLater(current.end - now, self._expire, key)
        return False

    def _tracked_key(self, key: str, now: float) -> str:
        self._expire_ended(key, now)
        if key in self._windows or len(self._windows) < self._max_keys:
            return key

        self._drop_idle(now)
        if len(self._windows) < self._max_keys:
            return key
        self._expire_ended(_OTHER_ADDRESSES, now)
        return _OTHER_ADDRESSES

    def _expire_ended(self, key: str, now: float) -> None:
        current = self._windows.get(key)
        if current is not None and now >= current.end:
            self._expire(key)

    def _drop_idle(self, now: float) -> None:
        for key in list(self._windows):
            self._expire_ended(key, now)

    def _expire(self, key: str) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.call is not None and window.call.active():
            window.call.cancel()
        if window.suppressed:
            self._report(key, window.suppressed)

    def flush(self) -> None:
        """Report every pending count now and cancel the timers, as when a port stops."""
        for key in list(self._windows):
            self._expire(key)


@dataclass
class HandshakeStats:
    """Counters of one server endpoint, for ``system.stats`` and tests."""

    completed: int = 0
    refused: int = 0
    rejections: Counter[str] = field(default_factory=Counter)


class HandshakeLog:
    """
    The log of one server endpoint's rejected handshakes and refused
    connections, rate-limited per peer address.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        log: Logger | None = None,
    ) -> None:
        self.log = log or Logger(namespace=LOG_NAMESPACE)
        self.stats = HandshakeStats()
        self._limiter = RepeatLimiter(clock, self._report_suppressed, burst=burst, window=window)

    def rejected(self, peer: IAddress | None, rejection: Rejection) -> None:
        """Count and log a handshake rejected for ``rejection``."""
        self.stats.rejections[str(rejection.reason)] += 1
        host = getattr(peer, "host", str(peer))
        if not self._limiter.allow(host):
            return

        certificate = "no certificate"
        if rejection.subject is not None:
            certificate = f"certificate {rejection.subject} issued by {rejection.issuer}"
        emit = self.log.info if rejection.reason is Reason.CLOSED_BY_PEER else self.log.warn
        emit(
            "Rejected TLS handshake from {peer}: {reason}: {detail} (presented: {certificate})",
            peer=describe_address(peer),
            reason=str(rejection.reason),
            detail=rejection.detail,
            certificate=certificate,
            subject=rejection.subject,
            issuer=rejection.issuer,
        )

    def refused(self, peer: IAddress | None, maximum: int) -> None:
        """Count and log a connection closed because ``maximum`` connections are open."""
        self.stats.refused += 1
        if self._limiter.allow("connection limit"):
            self.log.warn(
                "Closed new connection from {peer}: {open} open, the configured maximum",
                peer=describe_address(peer),
                open=plural(maximum, "connection"),
                maximum=maximum,
            )

    def _report_suppressed(self, key: str, count: int) -> None:
        self.log.warn(
            "Suppressed {lines} about {source} in the last {window:g} s",
            lines=plural(count, "similar log line"),
            count=count,
            source=key,
            window=self._limiter.window,
        )

    def flush(self) -> None:
        """Log the counts of suppressed lines now instead of at the end of their window."""
        self._limiter.flush()


class _HandshakeListener(Protocol):
    def handshake_succeeded(self) -> None: ...

    def handshake_failed(self, reason: Failure, connection: SSL.Connection | None) -> None: ...


@implementer(IHandshakeListener)
class _HandshakeGate(ProtocolWrapper):
    """
    Connects the application protocol once the TLS handshake has completed.

    Its transport is the ``TLSMemoryBIOProtocol``. If the handshake fails,
    the application protocol is never connected and ``listener`` learns why.
    """

    # Set by makeConnection: the TLS layer below this gate.
    transport: TLSMemoryBIOProtocol | None
    listener: _HandshakeListener | None = None
    _completed = False
    _translate_alerts = False

    def makeConnection(self, transport: Any) -> None:
        # Like ProtocolWrapper.makeConnection, without connecting the
        # application yet.
        directlyProvides(self, providedBy(transport))
        BaseProtocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def handshakeCompleted(self) -> None:
        self._completed = True
        # makeConnection made this gate provide every interface of the TLS
        # transport below it, so it passes for that transport.
        self.wrappedProtocol.makeConnection(cast(ITransport, self))
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        if self.listener is not None:
            self.listener.handshake_succeeded()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._completed:
            ProtocolWrapper.connectionLost(self, self._translate(reason))
            return
        self.factory.unregisterProtocol(self)
        if self.listener is not None:
            assert self.transport is not None
            self.listener.handshake_failed(reason, self.transport.getHandle())

    def _translate(self, reason: Failure) -> Failure:
        # In TLS 1.3 a client finishes its handshake before the server has
        # checked the client certificate, so the server's rejection arrives
        # as an alert after the handshake.
        if self._translate_alerts and isinstance(reason.value, SSL.Error):
            rejection = rejected_by_peer(reason.value)
            if rejection is not None:
                return Failure(rejection.to_error("the server rejected this client"))
        return reason


class _GateFactory(WrappingFactory[_HandshakeGate]):
    protocol = _HandshakeGate
    noisy = False


class _ServerGuard(ProtocolWrapper):
    """Watches one accepted connection from its first byte to the end of its handshake."""

    factory: ServerGuardFactory
    # Both are set by makeConnection, before any other event reaches this
    # guard. The transport is TCP, or the PROXY header reader that forwards
    # to TCP.
    transport: ITCPTransport
    wrappedProtocol: TLSMemoryBIOProtocol
    _timer: IDelayedCall | None = None
    _reported = False
    _received = False
    evicted = False

    def makeConnection(self, transport: Any) -> None:
        gate = cast(_HandshakeGate, self.wrappedProtocol.wrappedProtocol)
        gate.listener = self
        self._timer = self.factory.clock.callLater(
            self.factory.handshake_timeout, self._time_out
        )
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._received:
            self._received = True
            if data[0] != _TLS_HANDSHAKE_RECORD:
                self._report(Rejection(Reason.NOT_TLS, f"the first bytes were {data[:16]!r}"))
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def handshake_succeeded(self) -> None:
        self._cancel_timer()
        self.factory.handshake_log.stats.completed += 1

    def handshake_failed(self, reason: Failure, connection: SSL.Connection | None) -> None:
        self._cancel_timer()
        rejection = None
        if connection is not None:
            rejection = self.factory.server_tls.rejection_for(connection)
        if rejection is None and isinstance(reason.value, SSL.Error):
            rejection = reject_ssl_error(reason.value)
        if rejection is None:
            detail = "the peer closed the connection before the handshake completed"
            if not self._received:
                detail = "the peer closed the connection without sending anything"
            rejection = Rejection(Reason.CLOSED_BY_PEER, detail)
        self._report(rejection)

    def reject(self, rejection: Rejection) -> None:
        """Log ``rejection`` for a connection that a layer below closes before TLS starts."""
        self._cancel_timer()
        self._report(rejection)

    @property
    def handshake_pending(self) -> bool:
        """Whether the connection is still in its handshake and not yet cut off."""
        return self._timer is not None and not self.evicted

    def evict(self) -> None:
        """Cut off this unauthenticated connection to make room for a new one."""
        self._cancel_timer()
        self.evicted = True
        self._report(
            Rejection(
                Reason.EVICTED,
                "the connection maximum was reached and this was the oldest "
                "connection still in its handshake",
            )
        )
        self.transport.abortConnection()

    def _time_out(self) -> None:
        self._timer = None
        timeout = self.factory.handshake_timeout
        self._report(
            Rejection(Reason.HANDSHAKE_TIMEOUT, f"no complete handshake within {timeout:g} s")
        )
        self.transport.abortConnection()

    def _report(self, rejection: Rejection) -> None:
        if self._reported:
            return
        self._reported = True
        self.factory.handshake_log.rejected(self.transport.getPeer(), rejection)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self.evicted:
            self.factory.evictions_in_progress -= 1
        super().connectionLost(reason)


class ServerGuardFactory(WrappingFactory[_ServerGuard]):
    """
    Wraps an application factory in mutual TLS with ``server_tls``, a
    handshake timeout, a connection maximum and the rejection log.
    """

    protocol = _ServerGuard
    noisy = False

    def __init__(
        self,
        wrapped_factory: IProtocolFactory,
        server_tls: ServerTLS,
        *,
        clock: IReactorTime,
        handshake_log: HandshakeLog,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        tls_factory = TLSMemoryBIOFactory(server_tls, False, _GateFactory(wrapped_factory))
        super().__init__(tls_factory)
        self.server_tls = server_tls
        self.clock = clock
        self.handshake_log = handshake_log
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.evictions_in_progress = 0

    # Returning None refuses the connection, which Twisted allows but its
    # WrappingFactory annotation does not.
    def buildProtocol(self, addr: IAddress | None) -> _ServerGuard | None:  # type: ignore[override]
        # Evicted connections stay in self.protocols until their abort ends.
        open_connections = len(self.protocols) - self.evictions_in_progress
        if open_connections >= self.max_connections and not self._evict_oldest_handshake():
            self.handshake_log.refused(addr, self.max_connections)
            return None
        tls_protocol = self.wrappedFactory.buildProtocol(addr)
        if tls_protocol is None or tls_protocol.wrappedProtocol.wrappedProtocol is None:
            # The application factory refused the connection.
            return None
        return self.protocol(self, tls_protocol)

    def _evict_oldest_handshake(self) -> bool:
        # Peers that never finish a handshake must not lock verified clients
        # out: at the maximum, the oldest of them gives way to the newcomer.
        # Connections that completed their handshake are never evicted.
        for guard in self.protocols:
            if guard.handshake_pending:
                self.evictions_in_progress += 1
                guard.evict()
                return True
        return False

    def doStop(self) -> None:
        self.handshake_log.flush()
        super().doStop()


class _ClientAttempt:
    """One outgoing connection, from TCP connect to the end of its TLS handshake."""

    def __init__(
        self, clock: IReactorTime, client_tls: ClientTLS, server: str, timeout: float
    ) -> None:
        self.client_tls = client_tls
        self.server = server
        self.timeout = timeout
        self.gate: _HandshakeGate | None = None
        self.deferred: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)
        self._timer: IDelayedCall | None = clock.callLater(timeout, self._time_out)

    def attach(self, gate: _HandshakeGate) -> None:
        self.gate = gate
        gate.listener = self
        gate._translate_alerts = True

    def handshake_succeeded(self) -> None:
        self._stop_timer()
        assert self.gate is not None
        self.deferred.callback(self.gate.wrappedProtocol)

    def handshake_failed(self, reason: Failure, connection: SSL.Connection | None) -> None:
        self._stop_timer()
        if self.deferred.called:
            return
        self.deferred.errback(self._error_for(reason, connection))

    def connect_failed(self, reason: Failure) -> None:
        self._stop_timer()
        if self.deferred.called:
            return
        error = ConnectionFailed(f"cannot connect to {self.server}: {reason.getErrorMessage()}")
        self.deferred.errback(Failure(error))

    def _error_for(self, reason: Failure, connection: SSL.Connection | None) -> Failure:
        context = f"TLS handshake with {self.server} failed"
        rejection = None
        if connection is not None:
            rejection = self.client_tls.rejection_for(connection)
        if rejection is not None:
            return Failure(rejection.to_error(f"the server certificate of {self.server} was rejected"))
        if reason.check(TLSVerificationError, ConnectionFailed):
            return reason
        if isinstance(reason.value, SSL.Error):
            peer_rejection = rejected_by_peer(reason.value)
            if peer_rejection is not None:
                return Failure(peer_rejection.to_error(f"{self.server} rejected this client"))
            return Failure(ConnectionFailed(f"{context}: {reject_ssl_error(reason.value).detail}"))
        return Failure(ConnectionFailed(f"{context}: {reason.getErrorMessage()}"))

    def _time_out(self) -> None:
        self._timer = None
        if self.deferred.called:
            return
        error = ConnectionFailed(
            f"TLS handshake with {self.server} timed out after {self.timeout:g} s"
        )
        self.deferred.errback(Failure(error))
        if self.gate is not None and self.gate.transport is not None:
            self.gate.transport.abortConnection()

    def _cancel(self, deferred: defer.Deferred[IProtocol]) -> None:
        self._stop_timer()
        if self.gate is not None and self.gate.transport is not None:
            self.gate.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _ClientGateFactory(_GateFactory):
    def __init__(self, wrapped_factory: IProtocolFactory, attempt: _ClientAttempt) -> None:
        super().__init__(wrapped_factory)
        self._attempt = attempt

    def buildProtocol(self, addr: IAddress | None) -> _HandshakeGate:
        gate = super().buildProtocol(addr)
        self._attempt.attach(gate)
        return gate


def connect_tls(
    clock: IReactorTime,
    endpoint: IStreamClientEndpoint,
    client_tls: ClientTLS,
    factory: IProtocolFactory,
    *,
    server: str,
    timeout: float,
) -> defer.Deferred[IProtocol]:
    """
    Connect ``factory`` over ``endpoint`` in mutual TLS with ``client_tls``.

    Return a ``Deferred[IProtocol]`` that fires with the protocol built by
    ``factory`` once the handshake has completed, and fails with
    ``TLSVerificationError`` when a certificate is rejected, or with
    ``ConnectionFailed`` when the connection or handshake fails or takes
    longer than ``timeout`` seconds. Cancelling it aborts the connection.
    ``server`` names the server in error messages.

    With TLS 1.3 the server checks the client certificate after the client
    has finished its handshake, so a rejected client certificate reaches the
    protocol's ``connectionLost`` as a ``TLSVerificationError``.
    """
    attempt = _ClientAttempt(clock, client_tls, server, timeout)
    tls_factory = TLSMemoryBIOFactory(client_tls, True, _ClientGateFactory(factory, attempt))
    connecting = endpoint.connect(tls_factory)
    connecting.addErrback(attempt.connect_failed)

    def cancel_connecting(result: Any) -> Any:
        if not connecting.called:
            connecting.cancel()
        return result

    attempt.deferred.addBoth(cancel_connecting)
    return attempt.deferred
