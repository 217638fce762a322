"""
The server protocol: JSON-RPC 2.0 in netstrings on one connection, and the
factory that stores the limits shared by all connections.

``RPCServerProtocol`` is txJSON-RPC's netstring ``JSONRPC`` protocol with its
request handling replaced: frames are split by ``netrpc.framing``, messages
are read by ``netrpc.jsonrpc`` and calls are run by a
``netrpc.methods.MethodRegistry``. Replies go out as calls finish, in any
order, each with its request's id.

Every resource one connection can hold is bounded: the message size, the
batch length, the calls in flight, the time of one call, the reply bytes a
peer leaves unread, and the idle time. Beyond the calls in flight, the
connection is not read until replies drain. The factory bounds the number of connections and
drains them all for a graceful shutdown.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from txjsonrpc_ng.netstring.jsonrpc import JSONRPC, RPCFactory
from zope.interface import implementer

from netrpc._plural import plural
from netrpc import framing, jsonrpc
from netrpc.identity import PeerIdentity
from netrpc.jsonrpc import Reply, Request
from netrpc.methods import MethodRegistry, as_rpc_error

__all__ = ["ConnectionObserver", "RPCServerFactory", "RPCServerProtocol"]

# Defaults of the factory's limits. Sizes are in bytes, times in seconds.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
DEFAULT_MAX_BATCH_LENGTH = 100
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_CALL_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_UNSENT_BYTES = 4 * 1024 * 1024

# How long a closing connection waits for the peer's TLS close-notify, and
# how long connections get after a drain's grace period to send their last
# replies, before they are aborted.
CLOSE_TIMEOUT = 5.0

# The abort code of calls cancelled because their connection was lost; no
# reply is built for them.
_CONNECTION_LOST = 0

# Rejected connections are logged at most once per this many seconds.
REJECTION_LOG_INTERVAL = 10.0

log = Logger(namespace="netrpc.protocol")


def _new_error_id() -> str:
    """Return a short random id that ties an error reply to its log entry."""
    return secrets.token_hex(4)


def _format_address(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    if isinstance(address, IPv6Address):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _IServerTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    The methods a server connection calls on its transport, named for the
    type checker only. Twisted's TLS transport provides all three
    interfaces; the in-memory transport of ``netrpc.testing`` has the same
    methods.
    """


class ConnectionObserver:
    """
    Hooks the factory calls around each connection and call, for the access
    policy, the audit log and the counters. This base class allows every
    connection and call and records nothing.
    """

    def connection_identified(self, connection: RPCServerProtocol) -> str | None:
        """Return why ``connection`` must be closed now that its caller is known, or None."""
        return None

    def connection_lost(self, connection: RPCServerProtocol) -> None:
        """Forget ``connection``, which is closed."""

    def call_starting(self, connection: RPCServerProtocol, request: Request) -> Reply | None:
        """Return the error reply for a call that must not run, or None to run it."""
        return None

    def call_finished(
        self, connection: RPCServerProtocol, request: Request, reply: Reply | None, duration: float
    ) -> None:
        """
        Record a call that ran for ``duration`` seconds. ``reply`` is built
        even for a notification; it is None when the connection was lost.
        """


class _Call:
    """One request being run: its Deferred, deadline and where its reply goes."""

    __slots__ = ("request", "deliver", "deferred", "timer", "abort_code", "done", "started")

    def __init__(
        self, request: Request, deliver: Callable[[bytes | None], None], started: float
    ) -> None:
        self.request = request
        self.deliver = deliver
        self.started = started
        self.deferred: Deferred[Any] | None = None
        self.timer: IDelayedCall | None = None
        # Set when the server cancels the call: CALL_TIMEOUT, SHUTTING_DOWN
        # or _CONNECTION_LOST.
        self.abort_code: int | None = None
        self.done = False


class _BatchReply:
    """Collect the replies of one batch and send them as one array."""

    __slots__ = ("_parts", "_waiting", "_send")

    def __init__(self, size: int, send: Callable[[bytes], None]) -> None:
        self._parts: list[bytes | None] = [None] * size
        self._waiting = size
        self._send = send

    def deliver(self, index: int, payload: bytes | None) -> None:
        self._parts[index] = payload
        self._waiting -= 1
        if self._waiting:
            return
        # A batch of notifications gets no reply at all.
        parts = [part for part in self._parts if part is not None]
        if parts:
            self._send(jsonrpc.encode_batch(parts))


@implementer(IHandshakeListener, IPushProducer)
class RPCServerProtocol(JSONRPC):
    """
    One server connection. ``caller`` is the verified identity from the
    peer's client certificate once the TLS handshake is done; ``peer`` is
    the peer's address as ``host:port``.

    The transport drives it as an ``IPushProducer``: while the transport's
    send buffer is full, no new calls start and the connection is not read.
    """

    factory: RPCServerFactory
    # Set by makeConnection, before any other event reaches this protocol.
    transport: _IServerTransport

    def __init__(self) -> None:
        super().__init__()
        self.caller: PeerIdentity | None = None
        self.peer = ""
        self._identified = False
        self._calls: set[_Call] = set()
        self._queue: deque[bytes] = deque()
        self._dispatching = False
        self._reading_paused = False
        self._write_paused = False
        self._unsent_while_paused = 0
        self._closing = False
        self._draining = False
        self._connected = False
        self._close_started = False
        self._last_activity = 0.0
        self._idle_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._lost: Deferred[None] = Deferred()

    # --- Connection events ----------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        self.peer = _format_address(self.transport.getPeer())
        self._decoder = framing.NetstringDecoder(factory.max_message_size)
        self._max_in_flight = factory.max_in_flight
        self._connected = True

        if not factory._admit(self):
            self._closing = True
            self.transport.abortConnection()
            return
        self.transport.registerProducer(self, True)
        self._last_activity = factory.reactor.seconds()
        if factory.idle_timeout:
            self._idle_timer = factory.reactor.callLater(
                factory.idle_timeout, self._check_idle
            )

    def handshakeCompleted(self) -> None:
        self._identify()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._queue.clear()
        for timer in (self._idle_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._decoder.in_frame and not self._closing:
            log.info(
                "Connection from {peer} closed in the middle of a frame", peer=self.peer
            )
        # The replies of these calls can no longer be sent. Notifications
        # run on, since their caller expects no reply anyway.
        for call in list(self._calls):
            if not call.request.is_notification:
                self._abort_call(call, _CONNECTION_LOST)
        self.factory._forget(self)
        self.factory.observer.connection_lost(self)
        self._lost.callback(None)

    def _identify(self) -> PeerIdentity | None:
        """Read the caller's identity from the TLS transport, once."""
        if self._identified:
            return self.caller
        self._identified = True
        get_certificate = getattr(self.transport, "getPeerCertificate", None)
        certificate = get_certificate() if get_certificate is not None else None
        if certificate is not None:
            self.caller = PeerIdentity.from_certificate(
                certificate.to_cryptography(), self.peer
            )
        else:
            self.caller = self.factory.default_caller

        rejection = self.factory.observer.connection_identified(self)
        if rejection is not None and not self._closing:
            log.warn("Closing connection from {peer}: {reason}", peer=self.peer, reason=rejection)
            self._closing = True
            self._queue.clear()
            self.transport.abortConnection()
        return self.caller

    # --- Receiving ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # After a framing error or an idle close, a TLS transport may still
        # deliver what the peer sent before it saw the close.
        if self._closing:
            return
        self._last_activity = self.factory.reactor.seconds()
        try:
            frames = self._decoder.feed(data)
        except framing.FramingError as error:
            for frame in error.frames:
                self._message_received(frame)
            self._framing_failed(error)
            return
        for frame in frames:
            self._message_received(frame)
        self._update_reading()

    def stringReceived(self, string: bytes) -> None:
        self._message_received(string)

    def _message_received(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._draining:
            self._reject_message(frame, jsonrpc.SHUTTING_DOWN)
            return
        if self._queue or not self._can_dispatch():
            self._queue.append(frame)
            return
        self._dispatch(frame)

    def _can_dispatch(self) -> bool:
        return (
            len(self._calls) < self._max_in_flight
            and not self._write_paused
            and not self._closing
            and not self._draining
        )

    def _framing_failed(self, error: framing.FramingError) -> None:
        log.warn(
            "Closing connection from {peer}: {reason}", peer=self.peer, reason=error.reason
        )
        if error.boundary_known:
            self._send_reply(
                jsonrpc.error_reply(None, jsonrpc.PARSE_ERROR, data=str(error))
            )
        self._closing = True
        self._queue.clear()
        self._update_reading()
        self._close_when_idle()

    # --- Running calls --------------------------------------------------

    def _dispatch(self, frame: bytes) -> None:
        message = jsonrpc.parse_message(
            frame, max_batch_length=self.factory.max_batch_length
        )
        if not self._identified:
            self._identify()
        if self._closing:
            return

        if not message.is_batch:
            entry = message.entries[0]
            if type(entry) is Request:
                self._start_call(entry, self._send_optional)
            else:
                self._send_reply(entry)  # type: ignore[arg-type]
            return

        batch = _BatchReply(len(message.entries), self._send_payload)
        for index, entry in enumerate(message.entries):
            deliver = partial(batch.deliver, index)
            if type(entry) is Request:
                self._start_call(entry, deliver)
            else:
                deliver(self._encode(entry, None))  # type: ignore[arg-type]

    def _start_call(self, request: Request, deliver: Callable[[bytes | None], None]) -> None:
        rejection = self.factory.observer.call_starting(self, request)
        if rejection is not None:
            deliver(None if request.is_notification else self._encode(rejection, None))
            return

        call = _Call(request, deliver, self.factory.reactor.seconds())
        self._calls.add(call)
        deferred = self.factory.registry.call(request.method, request.params, self.caller)
        call.deferred = deferred
        if deferred.called and not deferred.paused and not isinstance(deferred.result, Failure):
            # Most methods return at once; replying from here saves the
            # callback chain, about a sixth of the protocol's time per call.
            self._call_succeeded(deferred.result, call)
            return
        deferred.addCallbacks(
            self._call_succeeded,
            self._call_failed,
            callbackArgs=(call,),
            errbackArgs=(call,),
        )
        # Most calls finish at once; only the others need a deadline.
        timeout = self.factory.call_timeout
        if not call.done and timeout:
            call.timer = self.factory.reactor.callLater(
                timeout, self._abort_call, call, jsonrpc.CALL_TIMEOUT
            )

    def _abort_call(self, call: _Call, code: int) -> None:
        if call.done or call.deferred is None:
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        call.abort_code = code
        if code == jsonrpc.CALL_TIMEOUT:
            log.warn(
                "Call to {method} from {peer} timed out after {timeout} s",
                method=call.request.method,
                peer=self.peer,
                timeout=self.factory.call_timeout,
            )
        call.deferred.cancel()

    # Both callbacks deliver the reply before _finish, because _finish may
    # close the connection once no call is left.

    def _call_succeeded(self, result: Any, call: _Call) -> None:
        request = call.request
        reply = jsonrpc.result_reply(request.id, result)
        call.deliver(None if request.is_notification else self._encode(reply, call))
        self._finish(call, reply)

    def _call_failed(self, failure: Failure, call: _Call) -> None:
        request = call.request
        reply: Reply | None = None
        if call.abort_code == _CONNECTION_LOST:
            pass
        elif call.abort_code is not None:
            reply = jsonrpc.error_reply(request.id, call.abort_code, data=self._abort_reason(call))
            call.deliver(None if request.is_notification else self._encode(reply, call))
        else:
            reply = self._error_reply_for(failure, request)
            call.deliver(None if request.is_notification else self._encode(reply, call))
        self._finish(call, reply)

    def _abort_reason(self, call: _Call) -> str:
        if call.abort_code == jsonrpc.CALL_TIMEOUT:
            return f"the call did not finish within {plural(float(self.factory.call_timeout), 'second')}"
        return "the server is shutting down and stopped the call"

    def _error_reply_for(self, failure: Failure, request: Request) -> Reply:
        """Build the reply for a failed call, logging failures that are not RPC errors."""
        error = as_rpc_error(failure.value)
        if error is not None and type(error.code) is int:
            if error.data is None:
                return jsonrpc.error_reply(request.id, error.code, error.message)
            return jsonrpc.error_reply(request.id, error.code, error.message, error.data)

        error_id = _new_error_id()
        log.failure(
            "Call to {method} from {peer} failed (error id {error_id})",
            failure,
            method=request.method,
            peer=self.peer,
            error_id=error_id,
        )
        return _internal_error(request.id, error_id)

    def _finish(self, call: _Call, reply: Reply | None) -> None:
        call.done = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._calls.discard(call)
        duration = self.factory.reactor.seconds() - call.started
        self.factory.observer.call_finished(self, call.request, reply, duration)
        if self._queue:
            self._dispatch_queued()
        if not self._calls:
            self._update_reading()
            if self._closing or self._draining:
                self._close_when_idle()

    def _dispatch_queued(self) -> None:
        # A call that finishes at once re-enters here through _finish; the
        # outer loop already takes care of the queue.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue and self._can_dispatch():
                self._dispatch(self._queue.popleft())
        finally:
            self._dispatching = False
        self._update_reading()

    # --- Sending --------------------------------------------------------

    def _encode(self, reply: Reply, call: _Call | None) -> bytes:
        """Encode a reply; a result JSON cannot represent becomes an internal error."""
        try:
            return jsonrpc.encode_message(reply)
        except jsonrpc.EncodingError as error:
            error_id = _new_error_id()
            log.error(
                "Reply to {method} from {peer} cannot be encoded as JSON "
                "(error id {error_id}): {reason}",
                method=call.request.method if call is not None else "",
                peer=self.peer,
                error_id=error_id,
                reason=str(error),
            )
            return jsonrpc.encode_message(_internal_error(reply.get("id"), error_id))

    def _send_reply(self, reply: Reply) -> None:
        self._send_payload(self._encode(reply, None))

    def _send_optional(self, payload: bytes | None) -> None:
        if payload is not None:
            self._send_payload(payload)

    def _send_payload(self, payload: bytes) -> None:
        if not self._connected:
            return
        self._last_activity = self.factory.reactor.seconds()
        frame = framing.encode(payload)
        if self._write_paused:
            self._unsent_while_paused += len(frame)
            if self._unsent_while_paused > self.factory.max_unsent_bytes:
                self._drop_slow_reader()
                return
        self.transport.write(frame)

    def _drop_slow_reader(self) -> None:
        log.warn(
            "Disconnecting {peer}: it left more than {limit} bytes of replies "
            "unread (max_unsent_bytes)",
            peer=self.peer,
            limit=self.factory.max_unsent_bytes,
        )
        self._closing = True
        self._connected = False
        self.transport.abortConnection()

    def _reject_message(self, frame: bytes, code: int) -> None:
        """Reply ``code`` to every request in a message that will not run."""
        message = jsonrpc.parse_message(frame, max_batch_length=self.factory.max_batch_length)
        replies = [
            jsonrpc.encode_message(
                jsonrpc.error_reply(entry.id, code, data=jsonrpc.NOT_STARTED)
                if type(entry) is Request
                else entry  # type: ignore[arg-type]
            )
            for entry in message.entries
            if type(entry) is not Request or not entry.is_notification
        ]
        if message.is_batch and replies:
            self._send_payload(jsonrpc.encode_batch(replies))
        elif replies:
            self._send_payload(replies[0])

    # --- Flow control: IPushProducer, called by the transport -------------

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._unsent_while_paused = 0
        if self._queue:
            self._dispatch_queued()
        self._update_reading()

    def stopProducing(self) -> None:
        """Do nothing: the transport is closing and ``connectionLost`` cleans up."""

    def _update_reading(self) -> None:
        """Pause or resume reading from the peer to match the current limits."""
        if self._draining and not self._closing:
            # New requests get SHUTTING_DOWN at once instead of silence at
            # the close, so reading goes on while the peer reads the replies.
            pause = self._write_paused
        else:
            pause = bool(self._queue) or not self._can_dispatch()
        if pause == self._reading_paused or not self._connected or self._close_started:
            return
        self._reading_paused = pause
        if pause:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # --- Closing --------------------------------------------------------

    def _check_idle(self) -> None:
        timeout = self.factory.idle_timeout
        idle_for = self.factory.reactor.seconds() - self._last_activity
        if self._calls or idle_for < timeout:
            delay = timeout if self._calls else timeout - idle_for
            self._idle_timer = self.factory.reactor.callLater(delay, self._check_idle)
            return
        self._idle_timer = None
        log.info(
            "Closing connection from {peer}: idle for {seconds:.0f} s", peer=self.peer, seconds=idle_for
        )
        self._closing = True
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        """Close with a TLS close-notify once no call is left to reply to."""
        if self._calls or not self._connected or self._close_started:
            return
        self._close_started = True
        self._closing = True
        self.transport.unregisterProducer()
        # TLS needs to read the peer's close-notify (and TCP its FIN) to
        # finish closing, so reading resumes; new data is ignored.
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        # Twisted's TLS transport keeps the connection open until the peer
        # replies with its own close-notify, which a peer that reads nothing
        # never does (https://github.com/twisted/twisted/issues/7926).
        self._close_timer = self.factory.reactor.callLater(CLOSE_TIMEOUT, self._close_timed_out)
        self.transport.loseConnection()

    def _close_timed_out(self) -> None:
        self._close_timer = None
        log.info(
            "Aborting connection from {peer}: no TLS close-notify in reply within {timeout:g} s",
            peer=self.peer,
            timeout=CLOSE_TIMEOUT,
        )
        self.abort()

    def drain(self) -> Deferred[None]:
        """
        Stop taking new calls and close once the calls in flight have
        replied. Requests that arrive meanwhile, or were waiting for a free
        slot, get ``SHUTTING_DOWN`` errors. The Deferred fires when the
        connection is closed.
        """
        self._draining = True
        queued, self._queue = list(self._queue), deque()
        for frame in queued:
            self._reject_message(frame, jsonrpc.SHUTTING_DOWN)
        self._update_reading()
        self._close_when_idle()
        return self._lost

    def stop_calls(self) -> None:
        """Cancel every call in flight; each caller gets a ``SHUTTING_DOWN`` error."""
        for call in list(self._calls):
            self._abort_call(call, jsonrpc.SHUTTING_DOWN)

    def abort(self) -> None:
        """Close the connection at once, without waiting for unsent data."""
        if self._connected:
            self.transport.abortConnection()

    # --- txJSON-RPC's method lookup, delegated to the registry ------------

    def _getFunction(self, functionPath: str) -> Callable[..., Any]:
        return self.factory.registry._getFunction(functionPath)

    def _listFunctions(self) -> list[str]:
        return self.factory.registry._listFunctions()


def _internal_error(request_id: jsonrpc.RequestId, error_id: str) -> Reply:
    return jsonrpc.error_reply(
        request_id, jsonrpc.INTERNAL_ERROR, data={"error_id": error_id}
    )


class RPCServerFactory(RPCFactory):
    """
    Build ``RPCServerProtocol`` connections that publish ``registry``.

    Limits (sizes in bytes, times in seconds; 0 turns a timeout off):

    - ``max_message_size``: largest netstring payload a peer may send.
    - ``max_batch_length``: most requests in one batch; longer batches get
      a single ``OVERLOADED`` error.
    - ``max_in_flight``: calls one connection may have running. When it is
      reached, the connection is not read until calls finish. A batch is
      started whole if any slot is free, so a connection can briefly run up
      to ``max_in_flight + max_batch_length - 1`` calls.
    - ``max_connections``: open connections; more are closed at once, and
      counted in ``rejected_connections``.
    - ``call_timeout``: a call still running after it is cancelled and its
      caller gets ``CALL_TIMEOUT``.
    - ``idle_timeout``: a connection with no call running and no traffic
      for this long is closed.
    - ``max_unsent_bytes``: reply bytes that may pile up while the peer
      reads nothing; beyond it the connection is aborted.

    ``default_caller`` is the identity given to methods on connections
    without a peer certificate, such as in-memory tests. ``observer``
    is called for every connection and call, and may reject them.
    """

    protocol = RPCServerProtocol

    def __init__(
        self,
        registry: MethodRegistry,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_batch_length: int = DEFAULT_MAX_BATCH_LENGTH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES,
        default_caller: PeerIdentity | None = None,
        observer: ConnectionObserver | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__(RPCServerProtocol, maxLength=max_message_size)
        _check_limits(
            max_message_size=max_message_size,
            max_batch_length=max_batch_length,
            max_in_flight=max_in_flight,
            max_connections=max_connections,
            max_unsent_bytes=max_unsent_bytes,
        )
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.registry = registry
        self.max_message_size = max_message_size
        self.max_batch_length = max_batch_length
        self.max_in_flight = max_in_flight
        self.max_connections = max_connections
        self.call_timeout = call_timeout
        self.idle_timeout = idle_timeout
        self.max_unsent_bytes = max_unsent_bytes
        self.default_caller = default_caller
        self.observer = observer or ConnectionObserver()
        self.connections: set[RPCServerProtocol] = set()
        self.rejected_connections = 0
        self._rejections_logged_at: float | None = None
        self._draining = False

    def _admit(self, connection: RPCServerProtocol) -> bool:
        """Count a new connection in, or return False when it must be closed."""
        if not self._draining and len(self.connections) < self.max_connections:
            self.connections.add(connection)
            return True
        self.rejected_connections += 1
        now = self.reactor.seconds()
        last = self._rejections_logged_at
        if last is None or now - last >= REJECTION_LOG_INTERVAL:
            self._rejections_logged_at = now
            log.warn(
                "Rejected connection from {peer}: {reason} "
                "({count} rejected since start)",
                peer=connection.peer,
                reason="shutting down"
                if self._draining
                else f"{plural(self.max_connections, 'connection')} open (max_connections)",
                count=self.rejected_connections,
            )
        return False

    def _forget(self, connection: RPCServerProtocol) -> None:
        self.connections.discard(connection)

    def drain(self, grace_seconds: float) -> Deferred[None]:
        """
        Shut every connection down gracefully.

        New connections are closed at once. Calls in flight get up to
        ``grace_seconds`` to finish and reply; calls still running then are
        cancelled and get ``SHUTTING_DOWN`` errors. Each connection closes
        with a TLS close-notify as soon as its last reply is sent. Connections
        still open ``CLOSE_TIMEOUT`` seconds after the grace period are
        aborted.
        The Deferred fires once every connection is closed.
        """
        self._draining = True
        connections = list(self.connections)
        closed = defer.gatherResults([c.drain() for c in connections])

        def stop_calls() -> None:
            for connection in list(self.connections):
                connection.stop_calls()

        def abort_stragglers() -> None:
            for connection in list(self.connections):
                connection.abort()

        timers = [
            self.reactor.callLater(grace_seconds, stop_calls),
            self.reactor.callLater(grace_seconds + CLOSE_TIMEOUT, abort_stragglers),
        ]

        def cancel_timers(result: object) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()

        return closed.addBoth(cancel_timers)


def _check_limits(**limits: int) -> None:
    for name, value in limits.items():
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
