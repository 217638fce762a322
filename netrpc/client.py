"""
The async Twisted client: one persistent mutual-TLS connection that carries
many JSON-RPC calls at once, each with a deadline.

    client = yield connect(reactor, "mtls:host=localhost:port=8700:"
                           "privateKey=alice.key:certKey=alice.crt:caCerts=server-ca.crt")
    product = yield client.call("multiply", 6, 7)

Calls are pipelined: each gets its own id and its reply is matched by id,
in whatever order the server sends them. Every call ends within its
deadline, with its result or with one of the typed errors of
``netrpc.exceptions``. A lost connection fails the calls in flight. The
client then reconnects in the background with exponential backoff, and
calls made in between wait for the new connection up to their deadline.

Given several servers, the client connects to one, starting at a random
one so that many clients spread across them, and moves to the next when a
connection fails or is lost.
"""

from __future__ import annotations

import os
import random as _random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from netrpc._backoff import Backoff
from netrpc._connection import ClientFactory, ClientProtocol
from netrpc._connector import Connector, error_text, rejection_after_handshake
from netrpc._pending import OutstandingRequest, PendingRequests
from netrpc._plural import plural
from netrpc._servers import Server, ServerSpec, mtls_servers, servers_from
from netrpc.exceptions import (
    CallTimeout,
    ConnectionFailed,
    OutcomeUnknown,
    RemoteProtocolError,
    TooManyCallsInFlight,
)
from netrpc.endpoints import DEFAULT_CONNECT_TIMEOUT
from netrpc.framing import encode
from netrpc.jsonrpc import (
    NOT_STARTED,
    SHUTTING_DOWN,
    EncodingError,
    Response,
    build_notification,
    build_request,
    encode_message,
    parse_response,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_REPLY_SIZE",
    "Backoff",
    "Client",
    "ClientStats",
    "Server",
    "connect",
    "connect_mtls",
    "mtls_servers",
]

# Seconds a call may take, from the moment it is made until its reply,
# unless the caller gives its own deadline.
DEFAULT_CALL_TIMEOUT = 30.0

# Calls sent on one connection and still waiting for their reply. Each
# costs the server a task and the client a timer, so the bound keeps both
# small. Raise it for servers that allow more calls in flight.
DEFAULT_MAX_IN_FLIGHT = 100

# Seconds close() waits for the server to end the TLS session before it
# drops the connection.
CLOSE_TIMEOUT = 5.0

# The largest reply accepted, in bytes of netstring payload. A longer
# declared length drops the connection before the payload is buffered.
DEFAULT_MAX_REPLY_SIZE = 16 * 1024 * 1024

Params = list[Any] | dict[str, Any]


@dataclass
class ClientStats:
    """Counters of one client, for monitoring and tests."""

    # Connections that completed the TLS handshake.
    connections: int = 0
    # Connection attempts that failed, including failed handshakes.
    connection_failures: int = 0
    # Replies that came after their call's deadline or cancellation, dropped.
    late_replies: int = 0
    # Replies whose id matches no call this client made, such as the reply
    # with a null id a server sends when it cannot read a request.
    unmatched_replies: int = 0
    # Calls sent again: idempotent ones after a connection loss, and those
    # a server that was shutting down did not start (or that are idempotent).
    retried_calls: int = 0


def connect(
    reactor: IReactorTime,
    endpoint: ServerSpec | Sequence[ServerSpec],
    *,
    timeout: float = DEFAULT_CALL_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    when_full: Literal["wait", "fail"] = "wait",
    max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
    backoff: Backoff | None = None,
    random: Callable[[], float] = _random.random,
) -> Deferred[Client]:
    """
    Connect to a JSON-RPC server and return a ``Client`` once it is ready.

    ``endpoint`` is an ``mtls:`` client endpoint string, an endpoint object,
    a ``Server``, or a sequence of these for failover. ``timeout`` is the
    default deadline of each call in seconds; ``connect_timeout`` bounds
    each connection attempt. At most ``max_in_flight`` calls are sent and
    unanswered at once; further calls wait for a free place, or fail with
    ``TooManyCallsInFlight`` when ``when_full`` is ``"fail"``.
    ``max_reply_size`` bounds a reply in bytes. ``backoff`` sets the
    reconnect delays and ``random`` returns floats in [0, 1) for the jitter
    and the choice of the first server (tests pass a fixed one).

    The Deferred fires with the ``Client`` after the first TLS handshake.
    It fails with ``TLSVerificationError`` when the server's certificate is
    rejected, with ``ConnectionFailed`` when every server was tried once and
    none could be reached within ``connect_timeout``, and with
    ``CancelledError`` when cancelled.
    """
    servers = servers_from(reactor, endpoint)
    if backoff is None:
        backoff = Backoff(random=random)
    client = Client(
        reactor,
        servers,
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_in_flight=max_in_flight,
        when_full=when_full,
        max_reply_size=max_reply_size,
        backoff=backoff,
        first_server=int(random() * len(servers)),
    )
    return client._start()


def connect_mtls(
    reactor: IReactorTime,
    host: str,
    port: int,
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    server_name: str | None = None,
    passphrase: bytes | str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Deferred[Client]:
    """
    Connect to ``host:port`` over mutual TLS with the three PEM files given.

    ``cert`` and ``key`` are this client's certificate and private key.
    ``ca`` contains the only CA certificates trusted to sign the server's
    certificate.
    ``server_name`` is the name the server's certificate must carry, by
    default ``host``. An encrypted ``key`` is unlocked once per process,
    see ``netrpc.passphrase.unlock_key``. ``options`` are those of
    ``connect()``, and the Deferred fires and fails as there.

    Raises ``ConfigurationError`` (``PassphraseError`` for the passphrase)
    at once when a file is missing or wrong.
    """
    servers = mtls_servers(
        reactor,
        [(host, port)],
        cert=cert,
        key=key,
        ca=ca,
        server_name=server_name,
        passphrase=passphrase,
        passphrase_file=passphrase_file,
        connect_timeout=options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
    )
    return connect(reactor, servers, **options)


class Client:
    """
    A JSON-RPC 2.0 client on one persistent connection, with reconnects.

    Make one with ``connect()``. The Deferred of every call fires exactly
    once, at the latest when the call's deadline passes. Share one client
    between all the code of a process, because its connection carries many
    calls at once. Use it from the reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        servers: Sequence[Server],
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        when_full: Literal["wait", "fail"] = "wait",
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        backoff: Backoff | None = None,
        first_server: int = 0,
    ) -> None:
        _check_options(servers, timeout, connect_timeout, when_full, max_reply_size)
        self._reactor = reactor
        self._timeout = timeout
        self._wait_when_full = when_full == "wait"
        self._pending = PendingRequests(max_in_flight)
        self._connector = Connector(
            reactor,
            servers,
            ClientFactory(self, max_reply_size),
            connect_timeout=connect_timeout,
            backoff=backoff if backoff is not None else Backoff(),
            first_server=first_server,
            on_failure=self._connect_failed,
        )
        self.stats = ClientStats()

        self._connection: ClientProtocol | None = None
        # The connection whose server replied that it is shutting down. No
        # new call is sent on it, and it is replaced once the server closes it.
        self._draining: ClientProtocol | None = None
        self._starting: Deferred[Client] | None = None
        self._closed = False
        self._closing: Deferred[None] | None = None
        self._close_timer: IDelayedCall | None = None

    # --- Public API -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up and ready for calls right now."""
        return self._connection is not None

    @property
    def server(self) -> str:
        """The name of the server connected to, or tried next."""
        return self._connector.server.name

    @property
    def in_flight(self) -> int:
        """The number of calls sent and waiting for their reply."""
        return self._pending.in_flight_count

    def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        wait_for_connection: bool = True,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Deferred[Any]:
        """
        Call ``method`` with positional or named params and return its result.

        Positional ``args`` become a params array and ``kwargs`` a params
        object; JSON-RPC cannot carry both in one call. To pass a named
        param called ``timeout``, ``wait_for_connection`` or ``idempotent``,
        use ``request()``. See ``request()`` for the options and for what
        the Deferred fires and fails with.
        """
        if args and kwargs:
            raise TypeError(
                f"call to {method!r} mixes positional and keyword arguments; JSON-RPC "
                "params are either an array or an object, so pass only one kind"
            )
        params: Params = dict(kwargs) if kwargs else list(args)
        return self.request(
            method,
            params,
            timeout=timeout,
            wait_for_connection=wait_for_connection,
            idempotent=idempotent,
        )

    def request(
        self,
        method: str,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        wait_for_connection: bool = True,
        idempotent: bool = False,
    ) -> Deferred[Any]:
        """
        Send one call with ``params`` (an array, an object or None) as given.

        ``timeout`` is the deadline in seconds, from now until the reply;
        None means the client's default. While the client is disconnected
        the call waits for the connection, or fails at once when
        ``wait_for_connection`` is false. Mark a call ``idempotent`` when
        running it twice does no harm: it is then sent once more, on the
        next connection, if the connection is lost before its reply.

        A server that is shutting down replies ``SHUTTING_DOWN``. The
        client then sends no new call on that connection, and sends the
        call once more on the next connection (to the next server) if the
        server reports that it did not start the call (error data
        ``jsonrpc.NOT_STARTED``) or the call is idempotent, provided that
        ``wait_for_connection`` is true.

        The Deferred fires with the call's result. It fails with:

        - ``RemoteError`` (code, message, data) when the server replies
          with an error;
        - ``CallTimeout`` when the deadline passes after the call was sent,
          or while it waited for a free in-flight place; a reply that comes
          later is dropped and counted in ``stats.late_replies``;
        - ``OutcomeUnknown`` when the connection is lost after the call was
          sent (and it was not retried), because the server may have run it;
        - ``TLSVerificationError`` when the server rejected this client's
          certificate just after the TLS handshake, as TLS 1.3 servers do;
        - ``ConnectionFailed`` when the call was never sent: no connection
          within the deadline, or none now with ``wait_for_connection``
          false, or the client was closed;
        - ``TooManyCallsInFlight`` at once when the in-flight limit is
          reached and the client was made with ``when_full="fail"``;
        - ``CancelledError`` at once when the caller cancels it; the call's
          place is freed and a reply that comes later is dropped.

        Raises ``TypeError`` for a method name that is not a string and
        ``EncodingError`` (a ``ValueError``) when ``params`` cannot be
        encoded as JSON, before anything is sent.
        """
        if params is not None and not isinstance(params, (list, dict)):
            raise TypeError(f"params {params!r} of {method!r} must be a list, a dict or None")
        label = repr(_checked_method(method))
        ids = self._pending.new_ids(1)
        frame = _encode(build_request(method, params, ids[0]), label)
        outstanding = OutstandingRequest(
            ids, frame, label, idempotent=idempotent, wait_for_connection=wait_for_connection
        )
        return self._submit(outstanding, timeout)

    def notify(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        wait_for_connection: bool = True,
        **kwargs: Any,
    ) -> Deferred[None]:
        """
        Send a notification: a call whose result the server never sends.

        The Deferred fires with None once the notification is written to
        the connection. That does not tell whether the server ran it.
        It fails with ``ConnectionFailed`` when no connection comes within
        ``timeout`` (or at once without one, when ``wait_for_connection`` is
        false) and with ``CancelledError`` when cancelled before it is sent.
        """
        if args and kwargs:
            raise TypeError(
                f"notification {method!r} mixes positional and keyword arguments; "
                "pass only one kind"
            )
        params: Params = dict(kwargs) if kwargs else list(args)
        label = f"notification {_checked_method(method)!r}"
        frame = _encode(build_notification(method, params), label)
        outstanding = OutstandingRequest((), frame, label, wait_for_connection=wait_for_connection)
        return self._submit(outstanding, timeout)

    def batch(
        self,
        calls: Iterable[tuple[str, Params | None]],
        *,
        timeout: float | None = None,
        wait_for_connection: bool = True,
        idempotent: bool = False,
    ) -> Deferred[list[Any]]:
        """
        Send several calls, each ``(method, params)``, as one JSON-RPC batch.

        The Deferred fires with a list in the order of ``calls``. For an
        entry that failed on the server, the list contains that entry's
        ``RemoteError`` instead of a result, so one failed entry does not
        hide the results of the others. For an entry missing from the
        server's reply, it contains a ``RemoteProtocolError``.

        The batch as a whole fails like ``request()`` does, for the reasons
        that hit every entry alike: ``CallTimeout``, ``OutcomeUnknown``,
        ``ConnectionFailed``, ``TLSVerificationError``,
        ``TooManyCallsInFlight``, ``CancelledError``. Each call of the batch
        counts towards the in-flight limit.

        Raises ``ValueError`` for an empty batch or one with more calls
        than the in-flight limit, and ``TypeError`` or ``EncodingError``
        for an entry that cannot be sent.
        """
        entries = list(calls)
        if not entries:
            raise ValueError("the batch is empty; JSON-RPC 2.0 rejects an empty batch")
        if len(entries) > self._pending.max_in_flight:
            raise ValueError(
                f"the batch has {len(entries)} calls, above the in-flight limit of "
                f"{self._pending.max_in_flight}; split it or raise max_in_flight"
            )

        ids = self._pending.new_ids(len(entries))
        messages = [
            build_request(_checked_method(method), params, request_id)
            for (method, params), request_id in zip(entries, ids)
        ]
        methods = ", ".join(repr(method) for method, _ in entries[:3])
        if len(entries) > 3:
            methods += ", ..."
        label = f"batch of {plural(len(entries), 'call')} ({methods})"
        outstanding = OutstandingRequest(
            ids,
            _encode(messages, label),
            label,
            idempotent=idempotent,
            wait_for_connection=wait_for_connection,
        )
        return self._submit(outstanding, timeout)

    def close(self) -> Deferred[None]:
        """
        Close the connection and stop reconnecting.

        Calls still waiting or in flight fail with ``ConnectionFailed``
        (``OutcomeUnknown`` for those already sent). The Deferred fires
        with None once the connection is closed; it never fails.
        """
        if self._closing is not None:
            return self._closing
        self._closed = True
        self._closing = Deferred()
        self._connector.stop()

        error = ConnectionFailed(f"the client for {self.server} was closed")
        self._fail_all(error)
        connection = self._connection
        if connection is None:
            self._closing.callback(None)
            return self._closing

        # A clean TLS close waits for the server's close_notify; a server
        # that never sends one must not keep close() from finishing.
        error = ConnectionFailed(f"{self.server} did not close within {CLOSE_TIMEOUT:g} s")
        self._close_timer = self._reactor.callLater(CLOSE_TIMEOUT, connection.abort, error)
        connection.close()
        return self._closing

    # --- Sending ----------------------------------------------------------

    def _submit(self, outstanding: OutstandingRequest, timeout: float | None) -> Deferred[Any]:
        seconds = self._timeout if timeout is None else timeout
        if not seconds > 0:
            raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
        deferred: Deferred[Any] = Deferred(lambda _: self._cancelled(outstanding))
        outstanding.deferred = deferred

        connection = self._usable_connection()
        if connection is not None and self._pending.has_room_for(outstanding):
            outstanding.timer = self._reactor.callLater(
                seconds, self._deadline_passed, outstanding, seconds
            )
            self._send(connection, outstanding)
            return deferred

        error = self._reason_not_to_wait(outstanding)
        if error is not None:
            outstanding.finished = True
            deferred.errback(error)
            return deferred

        outstanding.timer = self._reactor.callLater(
            seconds, self._deadline_passed, outstanding, seconds
        )
        self._pending.wait(outstanding)
        return deferred

    def _reason_not_to_wait(self, outstanding: OutstandingRequest) -> Exception | None:
        # The error to fail a request with at once, or None when it may wait.
        if self._closed:
            return ConnectionFailed(
                f"{outstanding.label} was not sent: the client for {self.server} is closed"
            )
        if self._usable_connection() is None and not outstanding.wait_for_connection:
            return ConnectionFailed(
                f"{outstanding.label} was not sent: not connected to {self.server}"
                f"{self._last_error_text()}"
            )
        if self._connection is not None and not self._wait_when_full:
            return TooManyCallsInFlight(
                f"{outstanding.label} was rejected: "
                f"{plural(self._pending.in_flight_count, 'call')} in flight to {self.server} "
                f"reached the maximum of {self._pending.max_in_flight}; "
                "retry later or raise max_in_flight"
            )
        return None

    def _send(self, connection: ClientProtocol, outstanding: OutstandingRequest) -> None:
        connection.send(outstanding.frame)
        if outstanding.ids:
            self._pending.sent(outstanding)
            return

        # A notification is done once written: no reply will come.
        outstanding.finished = True
        self._stop_timer(outstanding)
        outstanding.deferred.callback(None)  # type: ignore[union-attr]

    def _send_waiting(self) -> None:
        connection = self._usable_connection()
        if connection is None:
            return
        for outstanding in self._pending.take_sendable():
            self._send(connection, outstanding)

    # --- Ends of a call ---------------------------------------------------

    def _deadline_passed(self, outstanding: OutstandingRequest, seconds: float) -> None:
        outstanding.timer = None
        was_sent = outstanding.sent
        self._pending.discard(outstanding)

        if was_sent:
            error: Exception = CallTimeout(
                f"{outstanding.label} to {self.server} got no reply within {seconds:g} s; "
                "the server may still be running it"
            )
        elif self._usable_connection() is None:
            error = ConnectionFailed(
                f"{outstanding.label} was not sent: no connection to {self.server} "
                f"within {seconds:g} s{self._last_error_text()}"
            )
        else:
            error = CallTimeout(
                f"{outstanding.label} was not sent within {seconds:g} s because "
                f"{self.server} already had the maximum of "
                f"{plural(self._pending.max_in_flight, 'call')} in flight"
            )
        outstanding.deferred.errback(error)  # type: ignore[union-attr]
        self._send_waiting()

    def _cancelled(self, outstanding: OutstandingRequest) -> None:
        # Deferred.cancel() then fails the Deferred with CancelledError.
        self._stop_timer(outstanding)
        self._pending.discard(outstanding)
        self._send_waiting()

    def _fire_failures(self, failures: list[tuple[OutstandingRequest, Exception]]) -> None:
        for outstanding, error in failures:
            outstanding.finished = True
            self._stop_timer(outstanding)
            outstanding.deferred.errback(error)  # type: ignore[union-attr]

    def _stop_timer(self, outstanding: OutstandingRequest) -> None:
        timer = outstanding.timer
        if timer is not None:
            outstanding.timer = None
            timer.cancel()

    def frames_received(self, connection: ClientProtocol, frames: list[bytes]) -> None:
        """Match each reply to its call and fire the call's Deferred."""
        if connection is not self._connection:
            # A server speaking before the handshake completed; nothing
            # was sent on that connection, so nothing can match.
            return
        for frame in frames:
            try:
                responses = parse_response(frame)
            except RemoteProtocolError as error:
                connection.abort(error)
                return
            if len(responses) == 1:
                self._deliver_one(responses[0])
            else:
                self._deliver_batch(responses)
        if self._pending.has_waiting():
            self._send_waiting()

    def _deliver_one(self, response: Response) -> None:
        outstanding = self._pending.pop_reply_target(response.id)
        if outstanding is None:
            self._count_stray(response)
            return
        # Only an error reply can ask for the call to be sent again.
        if response.error is not None and self._resent_after_shutdown(outstanding, [response]):
            return
        self._stop_timer(outstanding)
        deferred: Deferred[Any] = outstanding.deferred  # type: ignore[assignment]

        if len(outstanding.ids) > 1:
            # The server replied to a batch with one reply object, most
            # likely an error about the batch as a whole.
            deferred.callback(_batch_values(outstanding, [response]))
        elif response.error is None:
            deferred.callback(response.result)
        else:
            deferred.errback(response.error)

    def _deliver_batch(self, responses: list[Response]) -> None:
        outstanding = None
        for response in responses:
            outstanding = self._pending.pop_reply_target(response.id)
            if outstanding is not None:
                break
        if outstanding is None:
            for response in responses:
                self._count_stray(response)
            return
        if self._resent_after_shutdown(outstanding, responses):
            return
        self._stop_timer(outstanding)
        outstanding.deferred.callback(_batch_values(outstanding, responses))  # type: ignore[union-attr]

    def _resent_after_shutdown(
        self, outstanding: OutstandingRequest, responses: list[Response]
    ) -> bool:
        """
        Queue ``outstanding`` again when its server replied that it is
        shutting down and the request may go to another server. Return
        whether it was queued.
        """
        errors = [response.error for response in responses]
        if not all(error is not None and error.code == SHUTTING_DOWN for error in errors):
            return False
        connection = self._connection
        if connection is not None and self._draining is not connection:
            self._draining = connection
            self._log.info(
                "{server} is shutting down; new calls wait for the next server",
                server=self.server,
            )

        not_started = all(error.data == NOT_STARTED for error in errors)  # type: ignore[union-attr]
        may_resend = not_started or outstanding.idempotent
        if not may_resend or outstanding.retried or not outstanding.wait_for_connection:
            return False
        if self._closed:
            return False
        outstanding.retried = True
        outstanding.sent = False
        outstanding.finished = False
        self.stats.retried_calls += 1
        self._pending.wait(outstanding, first=True)
        return True

    def _usable_connection(self) -> ClientProtocol | None:
        """Return the connection new calls may be sent on, which is not a draining one."""
        if self._connection is self._draining:
            return None
        return self._connection

    def _count_stray(self, response: Response) -> None:
        if self._pending.was_issued(response.id):
            self.stats.late_replies += 1
            return
        self.stats.unmatched_replies += 1
        if response.error is not None:
            self._log.warn(
                "Dropped an error reply from {server} that matches no call: {error}",
                server=self.server,
                error=str(response.error),
            )

    def _fail_all(self, error: ConnectionFailed) -> None:
        # Fail every request of the table, in flight or waiting.
        failures: list[tuple[OutstandingRequest, Exception]] = []
        for outstanding in self._pending.take_in_flight():
            failures.append((outstanding, OutcomeUnknown(_sent_call_lost(outstanding, str(error)))))
        for outstanding in self._pending.take_waiting():
            failures.append((outstanding, ConnectionFailed(f"{outstanding.label} was not sent: {error}")))
        self._fire_failures(failures)

    # --- Connection events ----------------------------------------------

    def _start(self) -> Deferred[Client]:
        # The connection may be ready before start() returns, which fires
        # and clears self._starting; so return the local reference.
        starting: Deferred[Client] = Deferred(lambda _: self._cancel_start())
        self._starting = starting
        self._connector.start()
        return starting

    def _cancel_start(self) -> None:
        self._starting = None
        self.close()

    def connection_ready(self, connection: ClientProtocol) -> None:
        """Start sending on ``connection``: the TLS handshake verified the server."""
        if self._closed:
            connection.close()
            return
        self._connector.ready(connection)
        self._connection = connection
        self.stats.connections += 1

        starting, self._starting = self._starting, None
        if starting is not None:
            starting.callback(self)
        self._send_waiting()

    def connection_lost(self, connection: ClientProtocol, reason: Failure) -> None:
        """Fail or retry the calls in flight on ``connection``, then reconnect."""
        if connection.close_reason is not None:
            reason = Failure(connection.close_reason)
        if connection is not self._connection:
            self._connector.lost_before_ready(connection, reason)
            return

        self._connection = None
        self._draining = None
        rejected = rejection_after_handshake(self.server, connection, reason)
        if rejected is not None:
            # The server read none of these calls, so the TLS error is their
            # outcome, and the attempt counts as failed for the backoff.
            failures = self._requeue_or_fail(rejected, sent_error=rejected)
            self._connector.failed(rejected)
        else:
            lost = ConnectionFailed(
                f"the connection to {self.server} was lost ({error_text(reason.value)})"
            )
            lost.__cause__ = reason.value
            failures = self._requeue_or_fail(lost)
            self._connector.lost(lost)

        if self._closed:
            self._finish_closing()
        self._fire_failures(failures)

    def _requeue_or_fail(
        self, lost: ConnectionFailed, sent_error: Exception | None = None
    ) -> list[tuple[OutstandingRequest, Exception]]:
        # Decide the fate of every request after a connection loss, without
        # firing any Deferred yet, because a callback may start new calls.
        failures: list[tuple[OutstandingRequest, Exception]] = []
        retry: list[OutstandingRequest] = []
        for outstanding in self._pending.take_in_flight():
            if outstanding.idempotent and not outstanding.retried and not self._closed:
                outstanding.retried = True
                outstanding.sent = False
                outstanding.finished = False
                retry.append(outstanding)
                self.stats.retried_calls += 1
            else:
                error = sent_error or OutcomeUnknown(_sent_call_lost(outstanding, str(lost)))
                failures.append((outstanding, error))

        for outstanding in retry + self._pending.take_waiting():
            if outstanding.wait_for_connection and not self._closed:
                self._pending.wait(outstanding)
            else:
                error = ConnectionFailed(f"{outstanding.label} was not sent: {lost}")
                failures.append((outstanding, error))
        return failures

    def _connect_failed(self, error: ConnectionFailed, gave_up: bool) -> None:
        self.stats.connection_failures += 1
        if not gave_up:
            return
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.errback(error)

    def _finish_closing(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)

    def _last_error_text(self) -> str:
        if self._connector.last_error is None:
            return ""
        return f"; the last connection attempt failed: {self._connector.last_error}"


# --- Helpers -------------------------------------------------------------


def _check_options(
    servers: Sequence[Server],
    timeout: float,
    connect_timeout: float,
    when_full: str,
    max_reply_size: int,
) -> None:
    if not servers:
        raise ValueError("no server given; pass at least one endpoint")
    if not timeout > 0:
        raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
    if not connect_timeout > 0:
        raise ValueError(f"connect_timeout {connect_timeout!r} must be a positive number of seconds")
    if when_full not in ("wait", "fail"):
        raise ValueError(f"when_full {when_full!r} must be 'wait' or 'fail'")
    if max_reply_size < 1:
        raise ValueError(f"max_reply_size {max_reply_size!r} must be at least 1 byte")


def _checked_method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method name {method!r} is not a string; pass the name as str")
    return method


def _encode(message: object, what: str) -> bytes:
    try:
        return encode(encode_message(message))  # type: ignore[arg-type]
    except EncodingError as error:
        raise EncodingError(f"cannot encode the params of {what} as JSON: {error}") from None


def _batch_values(outstanding: OutstandingRequest, responses: list[Response]) -> list[Any]:
    # One value per call of the batch, in the order the calls were given.
    by_id = {response.id: response for response in responses}
    values: list[Any] = []
    for position, request_id in enumerate(outstanding.ids):
        response = by_id.get(request_id)
        if response is None:
            values.append(
                RemoteProtocolError(
                    f"the reply to {outstanding.label} has no entry for call {position}"
                )
            )
        elif response.error is not None:
            values.append(response.error)
        else:
            values.append(response.result)
    return values


def _sent_call_lost(outstanding: OutstandingRequest, lost: str) -> str:
    return (
        f"{outstanding.label} was sent, then {lost} before its reply came; "
        "the outcome is unknown: the server may or may not have run it"
    )
