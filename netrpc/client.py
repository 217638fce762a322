"""
The async Twisted client: one persistent mutual-TLS connection that carries
many JSON-RPC calls at once, each with a deadline.

    client = yield connect(reactor, "mtls:host=localhost:port=8700:"
                           "privateKey=alice.key:certKey=alice.crt:caCerts=server-ca.crt")
    product = yield client.call("multiply", 6, 7)

Calls are pipelined: each gets its own id and its reply is matched by id,
in whatever order the server sends them. Every call ends within its
deadline: with its result, or with one of the typed errors of
``netrpc.exceptions``. A lost connection fails the calls in flight and is
re-established in the background with exponential backoff; calls made in
between wait for it, up to their deadline.

Given several servers, the client connects to one, starting at a random
one so that many clients spread across them, and moves to the next when a
connection fails or is lost.
"""

from __future__ import annotations

import os
import random as _random
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from netrpc._backoff import Backoff
from netrpc._connection import ClientFactory, ClientProtocol
from netrpc._pending import OutstandingRequest, PendingRequests
from netrpc.exceptions import (
    CallTimeout,
    ConnectionFailed,
    OutcomeUnknown,
    RemoteProtocolError,
    TLSVerificationError,
    TooManyCallsInFlight,
)
from netrpc.framing import encode
from netrpc.endpoints import (
    PREFIX,
    MutualTLSClientEndpoint,
    client_endpoint_from_options,
    split_description,
)
from netrpc.passphrase import unlock_key
from netrpc.tls import ClientTLS
from netrpc.tlsfiles import TLSFiles
from netrpc.verify import reject_ssl_error, rejected_by_peer
from netrpc.jsonrpc import (
    EncodingError,
    Response,
    build_notification,
    build_request,
    encode_message,
    parse_response,
)

__all__ = [
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

# Seconds for one connection attempt: TCP connect plus the TLS handshake.
DEFAULT_CONNECT_TIMEOUT = 10.0

# Calls sent and not yet answered on one connection. Each costs the server
# a task and the client a timer, so the bound keeps both small; raise it
# for servers that allow more calls in flight per connection.
DEFAULT_MAX_IN_FLIGHT = 100

# The largest reply accepted, in bytes of netstring payload. A longer
# declared length drops the connection before the payload is buffered.
DEFAULT_MAX_REPLY_SIZE = 16 * 1024 * 1024

# A connection that stayed up this many seconds counts as healthy, so the
# backoff starts over when it is lost. A server that accepts and drops
# connections quickly is retried ever more slowly instead.
STABLE_CONNECTION_SECONDS = 10.0

Params = list[Any] | dict[str, Any]


@dataclass(frozen=True)
class Server:
    """A server to connect to: its endpoint and the name used for it in messages."""

    endpoint: IStreamClientEndpoint
    name: str


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
    # Idempotent calls sent again after a connection loss.
    retried_calls: int = 0


def connect(
    reactor: IReactorTime,
    endpoint: str | IStreamClientEndpoint | Server | Sequence[str | IStreamClientEndpoint | Server],
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

    ``cert`` and ``key`` are this client's certificate and private key;
    ``ca`` holds the only CA trusted to sign the server's certificate.
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


def mtls_servers(
    reactor: IReactorTime,
    addresses: Iterable[tuple[str, int]],
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    server_name: str | None = None,
    passphrase: bytes | str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[Server]:
    """
    Build a ``Server`` for each ``(host, port)`` with the same client files,
    for ``connect()`` with failover.

    Each server's certificate must carry ``server_name``, or its own host
    name when ``server_name`` is None.
    """
    unlocked = unlock_key(key, passphrase=passphrase, passphrase_file=passphrase_file)
    files = TLSFiles(Path(key), Path(cert), Path(ca), passphrase=unlocked)
    creators: dict[str, ClientTLS] = {}
    servers = []
    for host, port in addresses:
        name = server_name or host
        if name not in creators:
            creators[name] = ClientTLS(files, name)
        endpoint = MutualTLSClientEndpoint(
            reactor, host, port, creators[name], timeout=connect_timeout
        )
        servers.append(Server(endpoint, endpoint.server))
    return servers


class Client:
    """
    A JSON-RPC 2.0 client on one persistent connection, with reconnects.

    Make one with ``connect()``. Every method that talks to the server
    returns a Deferred that fires exactly once, within the call's deadline.
    Share one client between all the code of a process: the connection
    carries many calls at once.
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
        self._servers = tuple(servers)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._wait_when_full = when_full == "wait"
        self._backoff = backoff if backoff is not None else Backoff()
        self._factory = ClientFactory(self, max_reply_size)
        self._pending = PendingRequests(max_in_flight)
        self.stats = ClientStats()

        self._server_index = first_server % len(self._servers)
        self._connection: ClientProtocol | None = None
        self._connected_at = 0.0
        self._attempt: Deferred[ClientProtocol] | None = None
        self._handshaking: ClientProtocol | None = None
        self._attempt_timer: IDelayedCall | None = None
        self._reconnect_timer: IDelayedCall | None = None
        self._failures = 0
        self._last_error: ConnectionFailed | None = None
        self._starting: Deferred[Client] | None = None
        self._initial_attempts_left = 0
        self._closed = False
        self._closing: Deferred[None] | None = None

    # --- Public API -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up and ready for calls right now."""
        return self._connection is not None

    @property
    def server(self) -> str:
        """The name of the server currently connected to, or tried next."""
        return self._servers[self._server_index].name

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

        The Deferred fires with the call's result. It fails with:

        - ``RemoteError`` (code, message, data) when the server replies
          with an error;
        - ``CallTimeout`` when the deadline passes after the call was sent,
          or while it waited for a free in-flight place; a reply that comes
          later is dropped and counted in ``stats.late_replies``;
        - ``OutcomeUnknown`` when the connection is lost after the call was
          sent (and it was not retried), because the server may have run it;
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
        ids = self._pending.new_ids(1)
        frame = _encode(build_request(_checked_method(method), params, ids[0]), repr(method))
        outstanding = OutstandingRequest(
            ids,
            frame,
            repr(method),
            idempotent=idempotent,
            wait_for_connection=wait_for_connection,
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
        the connection, which says nothing about whether the server ran it.
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
        frame = _encode(build_notification(_checked_method(method), params), f"notification {method!r}")
        outstanding = OutstandingRequest(
            (), frame, f"notification {method!r}", wait_for_connection=wait_for_connection
        )
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

        The Deferred fires with a list in the order of ``calls``. An entry
        the server answered with an error holds that ``RemoteError``
        instance instead of a result, so one failed entry does not hide the
        results of the others; a missing entry holds a
        ``RemoteProtocolError``. The batch as a whole fails like
        ``request()`` does: ``CallTimeout``, ``OutcomeUnknown``,
        ``ConnectionFailed``, ``TooManyCallsInFlight``, ``CancelledError``.
        Each call counts towards the in-flight limit.

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
        label = f"batch of {len(entries)} calls ({methods}{', ...' if len(entries) > 3 else ''})"
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
        self._stop_connecting()

        error = ConnectionFailed(f"the client for {self.server} was closed")
        self._fail_all(error)
        if self._connection is None:
            self._closing.callback(None)
        else:
            self._connection.close()
        return self._closing

    # --- Sending ----------------------------------------------------------

    def _submit(self, outstanding: OutstandingRequest, timeout: float | None) -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred(lambda _: self._cancelled(outstanding))
        outstanding.deferred = deferred

        if self._connection is not None and self._pending.has_room_for(outstanding):
            outstanding.timer = self._start_timer(outstanding, timeout)
            self._send(self._connection, outstanding)
            return deferred

        error = self._reason_not_to_wait(outstanding)
        if error is not None:
            outstanding.finished = True
            deferred.errback(error)
            return deferred

        outstanding.timer = self._start_timer(outstanding, timeout)
        self._pending.wait(outstanding)
        return deferred

    def _start_timer(self, outstanding: OutstandingRequest, timeout: float | None) -> IDelayedCall:
        seconds = self._timeout if timeout is None else timeout
        if not seconds > 0:
            raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
        return self._reactor.callLater(seconds, self._deadline_passed, outstanding, seconds)

    def _reason_not_to_wait(self, outstanding: OutstandingRequest) -> Exception | None:
        # The error to fail a request with at once, or None when it may wait.
        if self._closed:
            return ConnectionFailed(
                f"{outstanding.label} was not sent: the client for {self.server} is closed"
            )
        if self._connection is None and not outstanding.wait_for_connection:
            return ConnectionFailed(
                f"{outstanding.label} was not sent: not connected to {self.server}"
                f"{self._last_error_text()}"
            )
        if self._connection is not None and not self._wait_when_full:
            return TooManyCallsInFlight(
                f"{outstanding.label} was rejected: {self._pending.in_flight_count} calls are "
                f"in flight to {self.server}, the maximum is {self._pending.max_in_flight}; "
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
        connection = self._connection
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
                "the server may still run it"
            )
        elif self._connection is None:
            error = ConnectionFailed(
                f"{outstanding.label} was not sent: no connection to {self.server} "
                f"within {seconds:g} s{self._last_error_text()}"
            )
        else:
            error = CallTimeout(
                f"{outstanding.label} was not sent within {seconds:g} s because "
                f"{self._pending.max_in_flight} calls were in flight to {self.server}"
            )
        outstanding.deferred.errback(error)  # type: ignore[union-attr]
        self._send_waiting()

    def _cancelled(self, outstanding: OutstandingRequest) -> None:
        # Deferred.cancel() then fails the Deferred with CancelledError.
        self._stop_timer(outstanding)
        self._pending.discard(outstanding)
        self._send_waiting()

    def _stop_timer(self, outstanding: OutstandingRequest) -> None:
        timer = outstanding.timer
        if timer is not None:
            outstanding.timer = None
            timer.cancel()

    def frames_received(self, connection: ClientProtocol, frames: list[bytes]) -> None:
        """Match each reply to its call and fire the call's Deferred."""
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
        self._stop_timer(outstanding)
        deferred: Deferred[Any] = outstanding.deferred  # type: ignore[assignment]

        if len(outstanding.ids) > 1:
            # A batch answered with one reply object, most likely an error
            # about the batch as a whole.
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
        self._stop_timer(outstanding)
        outstanding.deferred.callback(_batch_values(outstanding, responses))  # type: ignore[union-attr]

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
        _fire_failures(self, failures)

    # --- Connecting -------------------------------------------------------

    def _start(self) -> Deferred[Client]:
        # The connection may be ready before _start_attempt returns, which
        # fires and clears self._starting; so return the local reference.
        starting: Deferred[Client] = Deferred(lambda _: self._cancel_start())
        self._starting = starting
        self._initial_attempts_left = len(self._servers)
        self._start_attempt()
        return starting

    def _cancel_start(self) -> None:
        self._starting = None
        self.close()

    def _start_attempt(self) -> None:
        self._reconnect_timer = None
        server = self._servers[self._server_index]
        self._attempt_timer = self._reactor.callLater(
            self._connect_timeout, self._attempt_timed_out, server
        )
        attempt = server.endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallbacks(self._transport_connected, self._attempt_failed, errbackArgs=(server,))

    def _transport_connected(self, connection: ClientProtocol) -> None:
        self._attempt = None
        if self._closed:
            connection.close()
        elif not connection.ready:
            self._handshaking = connection

    def _attempt_timed_out(self, server: Server) -> None:
        self._attempt_timer = None
        error = ConnectionFailed(
            f"connecting to {server.name} timed out after {self._connect_timeout:g} s"
        )
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
            self._connect_failed(error)
        elif self._handshaking is not None:
            self._handshaking.abort(error)

    def _attempt_failed(self, reason: Failure, server: Server) -> None:
        if self._attempt is None:
            # Cancelled by the connect timeout or by close(), already handled.
            return None
        self._attempt = None
        self._connect_failed(_connect_error(server.name, reason))
        return None

    def connection_ready(self, connection: ClientProtocol) -> None:
        """Start using ``connection``: the TLS handshake verified the server."""
        self._handshaking = None
        # An endpoint's Deferred may fire just after this; the attempt is over.
        self._attempt = None
        if self._closed:
            connection.close()
            return
        self._cancel_attempt_timer()
        self._connection = connection
        self._connected_at = self._reactor.seconds()
        self._last_error = None
        self.stats.connections += 1
        self._log.info("Connected to {server}", server=self.server)

        starting, self._starting = self._starting, None
        if starting is not None:
            starting.callback(self)
        self._send_waiting()

    def connection_lost(self, connection: ClientProtocol, reason: Failure) -> None:
        """Fail or retry the calls in flight on ``connection``, then reconnect."""
        server = self._servers[self._server_index]
        if connection.close_reason is not None:
            reason = Failure(connection.close_reason)

        if connection is self._handshaking:
            self._handshaking = None
            self._connect_failed(_connect_error(server.name, reason))
            return
        if connection is not self._connection:
            return

        self._connection = None
        rejected = _rejected_after_handshake(server.name, connection, reason)
        if rejected is not None:
            # The server never read these calls, so the TLS error is their
            # outcome; the attempt counts as failed for the backoff.
            failures = self._requeue_or_fail(rejected, sent_error=rejected)
            self._connect_failed(rejected)
            _fire_failures(self, failures)
            return

        lost = ConnectionFailed(f"the connection to {server.name} was lost ({_text(reason.value)})")
        lost.__cause__ = reason.value
        failures = self._requeue_or_fail(lost)
        if self._closed:
            self._finish_closing()
        else:
            if self._reactor.seconds() - self._connected_at >= STABLE_CONNECTION_SECONDS:
                self._failures = 0
            self._log.warn("{error}", error=str(lost))
            self._schedule_reconnect()
        _fire_failures(self, failures)

    def _requeue_or_fail(
        self, lost: ConnectionFailed, sent_error: Exception | None = None
    ) -> list[tuple[OutstandingRequest, Exception]]:
        # Decide the fate of every request after a connection loss, without
        # firing any Deferred yet: a callback may start new calls.
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

    def _connect_failed(self, error: ConnectionFailed) -> None:
        self._cancel_attempt_timer()
        self._last_error = error
        self.stats.connection_failures += 1
        if self._closed:
            self._finish_closing()
            return

        if self._starting is not None:
            self._initial_attempts_left -= 1
            if self._initial_attempts_left > 0:
                self._server_index = (self._server_index + 1) % len(self._servers)
                self._start_attempt()
                return
            starting, self._starting = self._starting, None
            self._closed = True
            starting.errback(error)
            return

        self._log.warn("{error}", error=str(error))
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        # Move on to the next server, and give every server a try at one
        # backoff level before the delay grows. A lost connection that was
        # not stable counts as a failure too, so a server that accepts and
        # drops connections is retried ever more slowly.
        self._server_index = (self._server_index + 1) % len(self._servers)
        delay = self._backoff.delay(self._failures // len(self._servers))
        self._failures += 1
        self._log.info(
            "Reconnecting to {server} in {delay:.2f} s", server=self.server, delay=delay
        )
        self._reconnect_timer = self._reactor.callLater(delay, self._start_attempt)

    def _cancel_attempt_timer(self) -> None:
        if self._attempt_timer is not None:
            self._attempt_timer.cancel()
            self._attempt_timer = None

    def _stop_connecting(self) -> None:
        self._cancel_attempt_timer()
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
            self._reconnect_timer = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self._handshaking is not None:
            self._handshaking.abort(ConnectionFailed("the client was closed"))

    def _finish_closing(self) -> None:
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)

    def _last_error_text(self) -> str:
        if self._last_error is None:
            return ""
        return f"; the last connection attempt failed: {self._last_error}"


# --- Helpers -------------------------------------------------------------


def servers_from(
    reactor: IReactorTime,
    endpoint: str | IStreamClientEndpoint | Server | Sequence[str | IStreamClientEndpoint | Server],
) -> list[Server]:
    """Turn the ``endpoint`` argument of ``connect()`` into a list of servers."""
    if isinstance(endpoint, (str, Server)) or IStreamClientEndpoint.providedBy(endpoint):
        items: Sequence[Any] = [endpoint]
    else:
        items = list(endpoint)  # type: ignore[arg-type]
    if not items:
        raise ValueError("no server given; pass at least one endpoint")
    return [_server_from(reactor, item) for item in items]


def _server_from(reactor: IReactorTime, item: str | IStreamClientEndpoint | Server) -> Server:
    if isinstance(item, Server):
        return item
    if isinstance(item, str):
        endpoint = _endpoint_from_string(reactor, item)
    elif IStreamClientEndpoint.providedBy(item):
        endpoint = item
    else:
        raise TypeError(
            f"server {item!r} is neither an endpoint string, an endpoint object nor a Server"
        )
    name = getattr(endpoint, "server", None)
    return Server(endpoint, name if isinstance(name, str) else repr(endpoint))


def _endpoint_from_string(reactor: IReactorTime, description: str) -> IStreamClientEndpoint:
    prefix, options = split_description(description)
    if prefix != PREFIX:
        return clientFromString(reactor, description)

    # Unlock the key here rather than in the endpoint parser, so that an
    # encrypted key may also be unlocked from the environment or a prompt,
    # and only once per process.
    passphrase = None
    key = options.get("privateKey")
    if key:
        passphrase = unlock_key(key, passphrase_file=options.pop("passphraseFile", None))
    return client_endpoint_from_options(reactor, options, passphrase=passphrase)


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


def _connect_error(server: str, reason: Failure) -> ConnectionFailed:
    # The mtls: endpoint already fails with TLSVerificationError or
    # ConnectionFailed; other endpoints fail with Twisted's or OpenSSL's errors.
    if isinstance(reason.value, ConnectionFailed):
        return reason.value
    if isinstance(reason.value, SSL.Error):
        return reject_ssl_error(reason.value).to_error(f"TLS handshake with {server} failed")
    error = ConnectionFailed(f"cannot connect to {server}: {_text(reason.value)}")
    error.__cause__ = reason.value
    return error


def _rejected_after_handshake(
    server: str, connection: ClientProtocol, reason: Failure
) -> ConnectionFailed | None:
    # With TLS 1.3 a client finishes its handshake before the server has
    # checked the client's certificate, so a rejection arrives as an alert
    # on a connection that looked ready. The mtls: endpoint turns the alert
    # into a TLSVerificationError; other TLS endpoints pass OpenSSL's error.
    if connection.received_any:
        return None
    if isinstance(reason.value, TLSVerificationError):
        return reason.value
    if isinstance(reason.value, SSL.Error):
        rejection = rejected_by_peer(reason.value)
        if rejection is not None:
            return rejection.to_error(f"{server} rejected this client")
    return None


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _fire_failures(client: Client, failures: list[tuple[OutstandingRequest, Exception]]) -> None:
    for outstanding, error in failures:
        outstanding.finished = True
        client._stop_timer(outstanding)
        outstanding.deferred.errback(error)  # type: ignore[union-attr]

