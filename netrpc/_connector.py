"""
The client's connection attempts: one at a time, each with a deadline,
moving through the servers in turn, with backoff between rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from netrpc._backoff import Backoff
from netrpc._connection import ClientFactory, ClientProtocol
from netrpc._servers import Server
from netrpc.exceptions import ConnectionFailed, TLSVerificationError
from netrpc.verify import reject_ssl_error, rejected_by_peer

# A connection that stayed up this many seconds counts as healthy, so the
# backoff starts over when it is lost. A server that accepts and drops
# connections quickly is retried ever more slowly instead.
STABLE_CONNECTION_SECONDS = 10.0


# Called with the error of each failed attempt, and whether the connector
# gave up: it does so only when no first connection could be made.
FailureCallback = Callable[[ConnectionFailed, bool], None]


class Connector:
    """
    Makes the connections of one client.

    ``start()`` tries each server once, in turn, and gives up when none
    connects. After the first connection, every failure or loss moves on to
    the next server after a backoff delay, until ``stop()``. Each server
    gets one attempt at a backoff level before the delay grows.

    The client reports the events of its ``ClientProtocol`` here:
    ``ready()``, then ``lost()``, or ``lost_before_ready()``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        servers: Sequence[Server],
        factory: ClientFactory,
        *,
        connect_timeout: float,
        backoff: Backoff,
        first_server: int,
        on_failure: FailureCallback,
    ) -> None:
        self._reactor = reactor
        self._servers = tuple(servers)
        self._factory = factory
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._on_failure = on_failure
        self._index = first_server % len(self._servers)

        self._failures = 0
        self._first_attempts_left = 0
        self._connected_at = 0.0
        self._attempt: Deferred[ClientProtocol] | None = None
        self._handshaking: ClientProtocol | None = None
        self._attempt_timer: IDelayedCall | None = None
        self._reconnect_timer: IDelayedCall | None = None
        self._stopped = False
        self.last_error: ConnectionFailed | None = None

    @property
    def server(self) -> Server:
        """The server connected to, or tried next."""
        return self._servers[self._index]

    def start(self) -> None:
        """Try each server once, in turn, until one connects."""
        self._first_attempts_left = len(self._servers)
        self._attempt_now()

    def stop(self) -> None:
        """Cancel the attempt under way and every later one."""
        self._stopped = True
        self._cancel_attempt_timer()
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
            self._reconnect_timer = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self._handshaking is not None:
            self._handshaking.abort(ConnectionFailed("the client was closed"))

    def ready(self, connection: ClientProtocol) -> None:
        """Record that ``connection`` is ready: the attempt succeeded."""
        self._cancel_attempt_timer()
        # An endpoint's Deferred may fire just after this; the attempt is over.
        self._attempt = None
        self._handshaking = None
        self._first_attempts_left = 0
        self._connected_at = self._reactor.seconds()
        self.last_error = None
        self._log.info("Connected to {server}", server=self.server.name)

    def lost_before_ready(self, connection: ClientProtocol, reason: Failure) -> None:
        """Count an attempt whose connection closed during the TLS handshake."""
        if connection is self._handshaking:
            self._handshaking = None
            self.failed(connect_error(self.server.name, reason))

    def lost(self, error: ConnectionFailed) -> None:
        """Reconnect after the loss of a ready connection, described by ``error``."""
        if self._stopped:
            return
        if self._reactor.seconds() - self._connected_at >= STABLE_CONNECTION_SECONDS:
            self._failures = 0
        self._log.warn("{error}", error=str(error))
        self._schedule_attempt()

    def failed(self, error: ConnectionFailed) -> None:
        """Count a failed attempt and try again, or give up on a first connection."""
        self._cancel_attempt_timer()
        self.last_error = error
        if self._stopped:
            return

        if self._first_attempts_left > 0:
            self._first_attempts_left -= 1
            gave_up = self._first_attempts_left == 0
            self._stopped = gave_up
            self._on_failure(error, gave_up)
            if not gave_up:
                self._index = (self._index + 1) % len(self._servers)
                self._attempt_now()
            return

        self._log.warn("{error}", error=str(error))
        self._on_failure(error, False)
        self._schedule_attempt()

    def _schedule_attempt(self) -> None:
        # A lost connection that was not stable counts as a failure too.
        self._index = (self._index + 1) % len(self._servers)
        delay = self._backoff.delay(self._failures // len(self._servers))
        self._failures += 1
        self._log.info(
            "Reconnecting to {server} in {delay:.2f} s", server=self.server.name, delay=delay
        )
        self._reconnect_timer = self._reactor.callLater(delay, self._attempt_now)

    def _attempt_now(self) -> None:
        self._reconnect_timer = None
        server = self.server
        self._attempt_timer = self._reactor.callLater(
            self._connect_timeout, self._attempt_timed_out, server
        )
        # The endpoint fires with the protocol that self._factory builds.
        attempt = cast("Deferred[ClientProtocol]", server.endpoint.connect(self._factory))
        self._attempt = attempt
        attempt.addCallbacks(self._transport_connected, self._attempt_failed, errbackArgs=(server,))

    def _transport_connected(self, connection: ClientProtocol) -> None:
        self._attempt = None
        if self._stopped:
            connection.close()
        elif not connection.ready:
            # Directly on Twisted's TLS layer the handshake is still going on.
            self._handshaking = connection

    def _attempt_failed(self, reason: Failure, server: Server) -> None:
        if self._attempt is None:
            # Cancelled by the attempt's deadline or by stop(), already counted.
            return
        self._attempt = None
        self.failed(connect_error(server.name, reason))

    def _attempt_timed_out(self, server: Server) -> None:
        self._attempt_timer = None
        error = ConnectionFailed(
            f"connecting to {server.name} timed out after {self._connect_timeout:g} s"
        )
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
            self.failed(error)
        elif self._handshaking is not None:
            self._handshaking.abort(error)

    def _cancel_attempt_timer(self) -> None:
        if self._attempt_timer is not None:
            self._attempt_timer.cancel()
            self._attempt_timer = None


def connect_error(server: str, reason: Failure) -> ConnectionFailed:
    """Describe a failed connection attempt to ``server``, naming it."""
    # The mtls: endpoint fails with TLSVerificationError or ConnectionFailed
    # already; other endpoints fail with Twisted's or OpenSSL's errors.
    value = reason.value
    if isinstance(value, ConnectionFailed):
        return value
    if isinstance(value, SSL.Error):
        return reject_ssl_error(value).to_error(f"TLS handshake with {server} failed")
    error = ConnectionFailed(f"cannot connect to {server}: {error_text(value)}")
    error.__cause__ = value
    return error


def rejection_after_handshake(
    server: str, connection: ClientProtocol, reason: Failure
) -> ConnectionFailed | None:
    """
    Return the error when the server rejected this client's certificate
    just after the handshake, or None for any other loss.

    With TLS 1.3 a client finishes its handshake before the server has
    checked the client's certificate, so the rejection arrives as an alert
    on a connection that looked ready. The ``mtls:`` endpoint turns the
    alert into a ``TLSVerificationError``; Twisted's TLS layer passes
    OpenSSL's error.
    """
    if connection.received_any:
        return None
    value = reason.value
    if isinstance(value, TLSVerificationError):
        return value
    if isinstance(value, SSL.Error):
        rejection = rejected_by_peer(value)
        if rejection is not None:
            return rejection.to_error(f"{server} rejected this client")
    return None


def error_text(error: BaseException | None) -> str:
    """Return the message of ``error``, or its class name when it has none."""
    return str(error) or type(error).__name__
