"""
The blocking client: JSON-RPC 2.0 calls over one persistent mutual-TLS
connection, for scripts and threads that run no Twisted reactor.

    with Client("localhost", 8700, cert="alice.crt", key="alice.key",
                ca="server-ca.crt") as client:
        print(client.call("multiply", 6, 7))

I/O uses only the stdlib ``socket`` and ``ssl`` modules. The netstring
framing and the JSON-RPC envelope are the same code the server and the async
client use. The server is verified twice: its chain against the server CA
file only (never the system trust store, and its certificate must carry
extendedKeyUsage serverAuth), then its name against the certificate.

Every call has a deadline that covers all of it: waiting for another
thread's call, connecting, the TLS handshake, sending and the reply. After a
timeout the connection stays open and the call's id is remembered, so its
reply, if it comes later, is dropped and counted instead of being taken as
the reply of a later call.

Thread safety: a ``Client`` may be shared between threads. A lock lets one
call at a time use the connection, so calls from several threads run one
after the other. Threads that need calls to run in parallel should each
make their own ``Client``, or use the async client, which sends many calls
at once on one connection.
"""

from __future__ import annotations

import itertools
import os
import random as _random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from netrpc._plural import plural
from netrpc.exceptions import (
    CallTimeout,
    ConfigurationError,
    ConnectionFailed,
    OutcomeUnknown,
    PassphraseError,
    RemoteProtocolError,
    TLSVerificationError,
)
from netrpc.framing import NetstringDecoder, encode
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
from netrpc.passphrase import DEFAULT_HINT, PASSPHRASE_VARIABLE, unlock_key
from netrpc.tlsfiles import TLSFiles, load_material
from netrpc.verify import (
    Reason,
    Role,
    check_extended_key_usage,
    reason_for_alert,
    reason_for_verify_code,
)

__all__ = [
    "DEFAULT_MAX_REPLY_SIZE",
    "DEFAULT_TIMEOUT",
    "MAX_ABANDONED_CALLS",
    "Client",
    "ClientStats",
    "build_context",
]

# Seconds a call may take, from the moment it is made until its reply,
# unless the caller gives its own deadline. The async client uses the same.
DEFAULT_TIMEOUT = 30.0

# The largest reply accepted, in bytes of netstring payload. A longer
# declared length closes the connection before the payload is buffered.
DEFAULT_MAX_REPLY_SIZE = 16 * 1024 * 1024

# Calls that timed out on one connection and whose replies may still come.
# Past this many, the connection is replaced before the next call, which
# also bounds the memory their ids take.
MAX_ABANDONED_CALLS = 1000

# TLS 1.2 suites allowed, in OpenSSL's cipher list syntax: ECDHE key
# exchange (forward secrecy) with an AEAD cipher only. TLS 1.3 suites are
# all of that kind and are not affected by this list.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_RECEIVE_SIZE = 65536

# Reads between two calls before the connection is replaced rather than
# drained further, so a server that keeps sending cannot hold a call.
_MAX_IDLE_READS = 64

Params = list[Any] | dict[str, Any]

# Words of the TLS alerts a server sends when it shares no protocol version
# or cipher suite with the client.
_NEGOTIATION_ALERTS = ("handshake failure", "protocol version", "insufficient security")

# Advice appended to the message of each kind of verification failure.
_WRONG_CA_ADVICE = "check that the CA file is the server CA that issued the server's certificate"
_ADVICE = {
    Reason.UNKNOWN_CA: _WRONG_CA_ADVICE,
    Reason.SELF_SIGNED: _WRONG_CA_ADVICE,
    Reason.NAME_MISMATCH: (
        "connect with a name that the certificate lists, or pass that name as the server name"
    ),
    Reason.EXPIRED: "the server's certificate must be renewed",
    Reason.NOT_YET_VALID: "check this machine's clock",
    Reason.WRONG_KEY_USAGE: "the server must use a certificate issued for serverAuth",
}


@dataclass
class ClientStats:
    """Counters of one client, for monitoring and tests."""

    # Connections that completed the TLS handshake.
    connections: int = 0
    # Replies that came after their call's deadline, dropped.
    late_replies: int = 0
    # Replies matching no call, such as an error with a null id that came
    # while a timed-out call's reply was still possible; dropped.
    unmatched_replies: int = 0
    # Calls sent a second time: see Client.request().
    retried_calls: int = 0


def build_context(
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    passphrase: bytes | str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """
    Build the client's TLS context from PEM files, checking each file first.

    The server CA file ``ca`` is the only trust anchor. An encrypted ``key``
    is unlocked as the async client unlocks it, with ``passphrase``, else
    ``passphrase_file``, else the ``NETRPC_KEY_PASSPHRASE`` environment
    variable, else a prompt when standard input is a terminal: see
    ``netrpc.passphrase.unlock_key``.

    Raise ``ConfigurationError``, naming the file and the fix, for a missing
    file, a key readable by group or others, a key that does not match
    ``cert``, an expired certificate or a CA file without a CA. Raise
    ``PassphraseError`` when ``key`` is encrypted and no source gives a
    passphrase, or the passphrase is wrong.
    """
    secret = unlock_key(key, passphrase=passphrase, passphrase_file=passphrase_file)
    files = TLSFiles(
        private_key=Path(key), certificate=Path(cert), ca_certificates=Path(ca), passphrase=secret
    )
    material = load_material(files, Role.CLIENT)

    # PROTOCOL_TLS_CLIENT requires a verified server certificate and checks
    # its name. OpenSSL also checks the leaf's purpose (extendedKeyUsage
    # serverAuth) for a client, reporting X.509 error 26 otherwise.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Names come from subjectAltName only, as RFC 6125 requires and as the
    # async client checks them: never from the subject's common name.
    context.hostname_checks_common_name = False

    # The CAs checked above, never the system store.
    trusted = [ca.public_bytes(Encoding.PEM).decode("ascii") for ca in material.ca_certificates]
    context.load_verify_locations(cadata="".join(trusted))
    _load_key_pair(context, files)
    return context


def _load_key_pair(context: ssl.SSLContext, files: TLSFiles) -> None:
    def supply_passphrase() -> bytes:
        # Without this callback OpenSSL would prompt on the terminal itself.
        if files.passphrase is None:
            raise PassphraseError(
                f"private key {str(files.private_key)!r} is encrypted and no "
                f"passphrase was given; {DEFAULT_HINT}, or set the environment "
                f"variable {PASSPHRASE_VARIABLE}"
            )
        return files.passphrase

    try:
        context.load_cert_chain(files.certificate, files.private_key, password=supply_passphrase)
    except (ssl.SSLError, OSError) as error:
        # load_material read the same files a moment ago, so this means
        # they changed in between.
        raise ConfigurationError(
            f"cannot load certificate {str(files.certificate)!r} with key "
            f"{str(files.private_key)!r}: {error}; check that the files did not change"
        ) from error


class Client:
    """
    A blocking JSON-RPC client on one persistent mutual-TLS connection.

    The connection opens at the first call (or at ``connect()``) and is
    reused by later calls. When the server has closed it between calls, the
    next call opens a new one. A request is sent a second time only in the
    cases that ``request()`` lists.

    ``timeout`` is the default deadline of a call in seconds. ``server_name``
    is the name the server's certificate must carry, a DNS name or an IP
    address; it defaults to the host connected to. The TLS files are read
    and checked once, here: see ``build_context`` for how an encrypted key
    is unlocked and for the errors this raises.

    ``failover`` lists more servers as ``(host, port)`` pairs. The client
    then starts at a random one of all the servers, so that many clients
    spread across them. ``random`` returns a float in [0, 1) for that
    choice. A new connection goes to the next server when the last one was
    lost or closed, and opening a connection tries each server once, within
    the call's deadline, before it raises the last error.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        passphrase: bytes | str | None = None,
        passphrase_file: str | os.PathLike[str] | None = None,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        failover: Sequence[tuple[str, int]] = (),
        random: Callable[[], float] = _random.random,
    ) -> None:
        _check_positive("timeout", timeout)
        _check_positive("max_reply_size", max_reply_size)
        self._servers = ((host, port), *failover)
        for _, server_port in self._servers:
            _check_port(server_port)

        self._server_name = server_name
        self._server_index = int(random() * len(self._servers)) % len(self._servers)
        self.host, self.port = self._servers[self._server_index]
        self.server_name = server_name or self.host
        self.timeout = timeout
        self.max_reply_size = max_reply_size
        self.stats = ClientStats()
        self._context = build_context(
            cert=cert, key=key, ca=ca, passphrase=passphrase, passphrase_file=passphrase_file
        )
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """Every server this client may connect to, as ``(host, port)``."""
        return self._servers

    @property
    def server(self) -> str:
        """The current server's address as ``host:port``, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """
        Close the connection, after the call in progress in another thread
        if there is one. Later calls raise ``ConnectionFailed``.
        """
        with self._lock:
            self._closed = True
            self._drop_connection()

    def connect(self, *, timeout: float | None = None) -> None:
        """
        Open the connection now rather than at the first call, to find a
        wrong address or a TLS problem early. Raise like ``request()``.
        """
        deadline = self._deadline(timeout)
        with self._locked(deadline, "connecting"):
            self._usable_connection(deadline)

    def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Any:
        """
        Call ``method`` with positional or named params and return its result.

        Positional ``args`` become a params array and ``kwargs`` a params
        object; JSON-RPC cannot carry both in one call. To pass a named
        param called ``timeout`` or ``idempotent``, use ``request()``, which
        also lists the errors raised.
        """
        params = _params_of(method, args, kwargs)
        return self.request(method, params, timeout=timeout, idempotent=idempotent)

    def request(
        self,
        method: str,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """
        Send one call with ``params`` (an array, an object or None) as given
        and return its result.

        ``timeout`` is the deadline in seconds; None means the client's
        default. The call is sent a second time, on a new connection (to the
        next server, when there are several), within the same deadline:

        - when the server replies ``SHUTTING_DOWN`` with the data
          ``jsonrpc.NOT_STARTED``, because it did not run the call;
        - when the call is marked ``idempotent`` (running it twice does no
          harm) and the connection is lost before the reply, or the server
          replies ``SHUTTING_DOWN``.

        Raise:

        - ``RemoteError`` (code, message, data) when the server replies with
          an error;
        - ``CallTimeout`` when the deadline passes, whatever step the call
          was at; the connection stays open and a later reply is dropped;
        - ``TLSVerificationError`` when the server's certificate is rejected,
          or the server rejects this client's certificate, with ``reason``;
        - ``OutcomeUnknown`` when the connection is lost after the call was
          sent, because the server may have run it;
        - ``ConnectionFailed`` when the call could not be sent;
        - ``RemoteProtocolError`` when the reply breaks netstring framing or
          JSON-RPC 2.0; the connection is closed;
        - ``TypeError`` or ``EncodingError`` (a ``ValueError``) when the
          request cannot be encoded, before anything is sent.
        """
        _check_params(method, params)
        request_id = next(self._ids)
        frame = _encode(build_request(method, params, request_id), repr(method))
        deadline = self._deadline(timeout)
        responses = self._exchange(frame, (request_id,), deadline, repr(method), idempotent)
        response = next(item for item in responses if item.id == request_id)
        if response.error is not None:
            raise response.error
        return response.result

    def notify(
        self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> None:
        """
        Send a notification: a call whose result the server never sends.

        Return once it is written to the connection, which does not show
        whether the server ran it. To pass a named param called
        ``timeout``, use ``send_notification()``.
        """
        self.send_notification(method, _params_of(method, args, kwargs), timeout=timeout)

    def send_notification(
        self, method: str, params: Params | None = None, *, timeout: float | None = None
    ) -> None:
        """
        Send a notification with ``params`` (an array, an object or None) as
        given. Raise ``CallTimeout`` and ``ConnectionFailed`` (or
        ``TLSVerificationError``) like ``request()``.
        """
        # NOTE: with TLS 1.3 a server that rejects this client's certificate
        # sends its alert only after the client's handshake is done. Nothing
        # reads that alert here, so a lone notification cannot detect it.
        _check_params(method, params)
        label = f"notification {method!r}"
        frame = _encode(build_notification(method, params), label)
        self._exchange(frame, (), self._deadline(timeout), label)

    def batch(
        self,
        calls: Iterable[tuple[str, Params | None]],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> list[Any]:
        """
        Send several calls, each ``(method, params)``, as one JSON-RPC batch.

        Return a list in the order of ``calls``. Where the server returned
        an error, the entry is that ``RemoteError`` instance instead of a
        result, so one failed entry does not hide the others. Where the
        reply lacks an entry, the list contains a ``RemoteProtocolError``. The batch as a whole
        raises, and is sent again, like ``request()``. Raise ``ValueError``
        for an empty batch.
        """
        entries = list(calls)
        if not entries:
            raise ValueError("the batch is empty; JSON-RPC 2.0 rejects an empty batch")
        for method, params in entries:
            _check_params(method, params)

        ids = tuple(next(self._ids) for _ in entries)
        label = _batch_label([method for method, _ in entries])
        requests = [
            build_request(method, params, request_id)
            for (method, params), request_id in zip(entries, ids)
        ]
        frame = _encode(requests, label)
        responses = self._exchange(frame, ids, self._deadline(timeout), label, idempotent)
        return _batch_values(label, ids, responses)

    # --- One exchange -----------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        seconds = self.timeout if timeout is None else timeout
        _check_positive("timeout", seconds)
        return time.monotonic() + seconds

    def _locked(self, deadline: float, label: str) -> _DeadlineLock:
        return _DeadlineLock(self._lock, deadline, f"{label} to {self.server}")

    def _exchange(
        self,
        frame: bytes,
        ids: tuple[int, ...],
        deadline: float,
        label: str,
        idempotent: bool = False,
    ) -> list[Response]:
        """
        Send ``frame`` and return the responses to ``ids`` (none for a
        notification), all before ``deadline``. Send it once more in the
        cases that ``request()`` lists.
        """
        with self._locked(deadline, label):
            try:
                responses = self._exchange_once(frame, ids, deadline, label)
            except OutcomeUnknown:
                if not idempotent:
                    raise
            else:
                if not _may_resend_after_shutdown(responses, idempotent):
                    return responses
                # The server is draining: the next call goes elsewhere.
                self._drop_connection()
            self.stats.retried_calls += 1
            return self._exchange_once(frame, ids, deadline, label)

    def _exchange_once(
        self, frame: bytes, ids: tuple[int, ...], deadline: float, label: str
    ) -> list[Response]:
        connection = self._usable_connection(deadline)
        self._send(connection, frame, deadline, label)
        if not ids:
            return []
        return self._receive_reply(connection, ids, deadline, label)

    def _usable_connection(self, deadline: float) -> _Connection:
        if self._closed:
            raise ConnectionFailed(f"the client for {self.server} was closed")

        connection = self._connection
        if connection is not None and not self._still_usable(connection):
            self._drop_connection()
            connection = None
        if connection is None:
            connection = self._open(deadline)
            self._connection = connection
        return connection

    def _still_usable(self, connection: _Connection) -> bool:
        # Between calls, only late replies or the server's close can be
        # waiting. Reading them now separates a connection that the server
        # closed while idle, which is replaced, from a live one.
        try:
            frames, alive = connection.read_available()
        except (RemoteProtocolError, OSError):
            return False
        for frame in frames:
            if not self._drop_late_reply(connection, frame):
                return False
        return alive and len(connection.abandoned) <= MAX_ABANDONED_CALLS

    def _drop_late_reply(self, connection: _Connection, frame: bytes) -> bool:
        """Count and drop a reply that came between calls; False if it is invalid."""
        try:
            responses = parse_response(frame)
        except RemoteProtocolError:
            return False
        ids = {response.id for response in responses}
        if ids <= connection.abandoned:
            connection.abandoned -= ids
            self.stats.late_replies += 1
        else:
            self.stats.unmatched_replies += 1
        return True

    def _open(self, deadline: float) -> _Connection:
        for attempt in range(len(self._servers)):
            try:
                tls_socket = _open_tls(
                    self._context, self.host, self.port, self.server_name, deadline
                )
            except (ConnectionFailed, CallTimeout):
                last_server = attempt == len(self._servers) - 1
                if last_server or time.monotonic() >= deadline:
                    raise
                self._next_server()
                continue
            self.stats.connections += 1
            return _Connection(tls_socket, self.max_reply_size)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _next_server(self) -> None:
        self._server_index = (self._server_index + 1) % len(self._servers)
        self.host, self.port = self._servers[self._server_index]
        self.server_name = self._server_name or self.host

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            # The next connection goes to the next server, so that a lost
            # or draining server is not the first one tried again.
            self._next_server()

    def _send(self, connection: _Connection, frame: bytes, deadline: float, label: str) -> None:
        try:
            connection.send(frame, deadline)
        except TimeoutError:
            # Part of the frame may be on the wire, so the stream cannot
            # carry another request.
            self._drop_connection()
            raise CallTimeout(
                f"{label} timed out while sending to {self.server}: "
                "the server does not read what is sent to it"
            ) from None
        except OSError as error:
            self._drop_connection()
            raise self._lost(error, f"cannot send {label} to {self.server}") from error

    def _receive_reply(
        self, connection: _Connection, ids: tuple[int, ...], deadline: float, label: str
    ) -> list[Response]:
        while True:
            try:
                frame = connection.next_frame(deadline)
            except TimeoutError:
                connection.abandoned.update(ids)
                raise CallTimeout(
                    f"{label} to {self.server} got no reply within its deadline"
                ) from None
            except RemoteProtocolError:
                self._drop_connection()
                raise
            except OSError as error:
                self._drop_connection()
                raise self._lost_after_send(error, label) from error

            responses = self._match(connection, frame, ids, label)
            if responses is not None:
                return responses

    def _match(
        self, connection: _Connection, frame: bytes, ids: tuple[int, ...], label: str
    ) -> list[Response] | None:
        """Return the responses in ``frame`` if they reply to ``ids``; drop late ones."""
        try:
            responses = parse_response(frame)
        except RemoteProtocolError:
            self._drop_connection()
            raise

        received = {response.id for response in responses}
        if received & set(ids):
            return responses
        if received <= connection.abandoned:
            connection.abandoned -= received
            self.stats.late_replies += 1
            return None
        if received == {None} and len(responses) == 1 and responses[0].error is not None:
            # A server that cannot read a request replies with a null id.
            # Only the current request can be meant when no earlier call is
            # still waiting for its reply.
            if not connection.abandoned:
                raise responses[0].error
            self.stats.unmatched_replies += 1
            return None

        self._drop_connection()
        shown = sorted(map(repr, received))
        raise RemoteProtocolError(
            f"{self.server} replied to {label} with id {', '.join(shown)}, "
            "which matches no call made on this connection"
        )

    def _lost(self, error: OSError, context: str) -> ConnectionFailed:
        if isinstance(error, ssl.SSLError):
            rejected = _rejected_by_server(error, self.server)
            if rejected is not None:
                return rejected
        return ConnectionFailed(f"{context}: {_describe_os_error(error)}")

    def _lost_after_send(self, error: OSError, label: str) -> ConnectionFailed:
        # With TLS 1.3 the server checks this client's certificate after
        # the client has finished its handshake, so a rejection arrives as
        # an alert where the first reply was expected.
        if isinstance(error, ssl.SSLError):
            rejected = _rejected_by_server(error, self.server)
            if rejected is not None:
                return rejected
        return OutcomeUnknown(
            f"{label} was sent to {self.server}, then the connection was lost "
            f"({_describe_os_error(error)}) before its reply came; the outcome is "
            "unknown: the server may or may not have run it"
        )


class _DeadlineLock:
    """The client's lock, acquired within a call's deadline."""

    def __init__(self, lock: threading.Lock, deadline: float, label: str) -> None:
        self._lock = lock
        self._deadline = deadline
        self._label = label

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=max(0.0, self._deadline - time.monotonic())):
            raise CallTimeout(
                f"{self._label} timed out waiting for another thread's call on the same client"
            )

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


class _Connection:
    """One TLS connection, the decoder of its replies, and the ids of timed-out calls."""

    def __init__(self, tls_socket: ssl.SSLSocket, max_reply_size: int) -> None:
        self._socket = tls_socket
        self._decoder = NetstringDecoder(max_reply_size)
        self._frames: list[bytes] = []
        self.abandoned: set[Any] = set()

    def send(self, data: bytes, deadline: float) -> None:
        """Write all of ``data``; raise ``TimeoutError`` when ``deadline`` passes first."""
        view = memoryview(data)
        while view:
            self._socket.settimeout(_remaining(deadline))
            sent = self._socket.send(view)
            view = view[sent:]

    def next_frame(self, deadline: float) -> bytes:
        """
        Return the next complete reply payload. Raise ``TimeoutError`` when
        ``deadline`` passes, ``ConnectionResetError`` when the server closes
        the connection and ``RemoteProtocolError`` for invalid framing.
        """
        while not self._frames:
            self._socket.settimeout(_remaining(deadline))
            data = self._socket.recv(_RECEIVE_SIZE)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)

    def read_available(self) -> tuple[list[bytes], bool]:
        """
        Read what has arrived, without waiting. Return the complete payloads
        and whether the connection is still worth using: False when the
        server closed it, or when more than ``_MAX_IDLE_READS`` reads did
        not empty it.
        """
        self._socket.settimeout(0.0)
        alive = False
        try:
            for _ in range(_MAX_IDLE_READS):
                data = self._socket.recv(_RECEIVE_SIZE)
                if not data:
                    break
                self._frames.extend(self._decoder.feed(data))
        except (ssl.SSLWantReadError, BlockingIOError):
            alive = True
        frames, self._frames = self._frames, []
        return frames, alive

    def close(self) -> None:
        """Close the socket without waiting for the server's close_notify."""
        try:
            self._socket.close()
        except OSError:
            pass


def _open_tls(
    context: ssl.SSLContext, host: str, port: int, server_name: str, deadline: float
) -> ssl.SSLSocket:
    """Connect to ``host:port`` and complete the TLS handshake before ``deadline``."""
    server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=_remaining(deadline))
    except TimeoutError:
        raise CallTimeout(f"connecting to {server} timed out") from None
    except OSError as error:
        raise ConnectionFailed(
            f"cannot connect to {server}: {_describe_os_error(error)}; "
            "check the address and that the server is running"
        ) from error

    try:
        raw.settimeout(_remaining(deadline))
        tls = context.wrap_socket(raw, server_hostname=server_name)
    except ssl.SSLCertVerificationError as error:
        raw.close()
        raise _rejected_server(error, server, server_name) from None
    except ssl.SSLError as error:
        raw.close()
        raise _rejected_by_server(error, server) or _handshake_failed(error, server) from error
    except TimeoutError:
        raw.close()
        raise CallTimeout(f"the TLS handshake with {server} timed out") from None
    except OSError as error:
        raw.close()
        raise ConnectionFailed(
            f"TLS handshake with {server} failed: {_describe_os_error(error)}"
        ) from error

    _check_server_usage(tls, server)
    return tls


def _check_server_usage(tls: ssl.SSLSocket, server: str) -> None:
    """
    Require extendedKeyUsage serverAuth on the server's certificate.

    OpenSSL's purpose check lets a certificate without any extendedKeyUsage
    pass; the async client and the daemon require it, so this client does too.
    """
    der = tls.getpeercert(binary_form=True)
    if der is None:
        return
    rejection = check_extended_key_usage(x509.load_der_x509_certificate(der), Role.SERVER)
    if rejection is None:
        return

    tls.close()
    context = f"TLS handshake with {server} failed: the server's certificate was rejected"
    raise rejection.to_error(context)


def _rejected_server(
    error: ssl.SSLCertVerificationError, server: str, server_name: str
) -> TLSVerificationError:
    """Explain why this client rejected the server's certificate."""
    code = error.verify_code
    reason = reason_for_verify_code(code) if code is not None else Reason.HANDSHAKE_FAILED
    detail = (error.verify_message or "no detail from OpenSSL").rstrip(".")
    message = (
        f"TLS handshake with {server} failed: the server's certificate was rejected "
        f"({reason}): {detail}"
    )
    if reason is Reason.NAME_MISMATCH and repr(server_name) not in detail:
        message += f" (the name checked was {server_name!r})"
    advice = _ADVICE.get(reason)
    if advice:
        message += f"; {advice}"
    return TLSVerificationError(message, str(reason))


def _rejected_by_server(error: ssl.SSLError, server: str) -> TLSVerificationError | None:
    """Return the error for an alert by which the server rejected this client's certificate."""
    alert = _alert_text(error)
    # Only alerts about a certificate reject this client's; others, such as
    # "handshake failure", are about the TLS versions or cipher suites.
    if alert is None or ("certificate" not in alert and "unknown ca" not in alert):
        return None
    reason = reason_for_alert(alert)
    return TLSVerificationError(
        f"{server} rejected this client's certificate ({reason}): the server sent "
        f"{alert!r}; check that the certificate is issued by the client CA the "
        "server trusts, and is neither expired nor revoked",
        str(reason),
    )


def _handshake_failed(error: ssl.SSLError, server: str) -> ConnectionFailed:
    message = f"TLS handshake with {server} failed: {_describe_os_error(error)}"
    alert = _alert_text(error)
    if alert is not None and any(words in alert for words in _NEGOTIATION_ALERTS):
        message += (
            f"; the server sent {alert!r}, so it most likely shares no TLS version or "
            "cipher suite with this client, which requires TLS 1.2 or later with "
            "ECDHE and AES-GCM or ChaCha20-Poly1305"
        )
    return ConnectionFailed(message)


def _alert_text(error: ssl.SSLError) -> str | None:
    # ssl reports an alert as a reason such as TLSV1_ALERT_UNKNOWN_CA;
    # verify.py matches the words of OpenSSL's message form.
    alert = (error.reason or "").lower().replace("_", " ")
    return alert if "alert" in alert else None


def _remaining(deadline: float) -> float:
    """Seconds left until ``deadline``; raise ``TimeoutError`` when none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the deadline passed")
    return remaining


def _describe_os_error(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _check_port(port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigurationError(f"port {port!r} is invalid; give a number from 1 to 65535")


def _may_resend_after_shutdown(responses: list[Response], idempotent: bool) -> bool:
    """Tell whether every response is a SHUTTING_DOWN error that allows sending the call again."""
    errors = [response.error for response in responses]
    if not errors or not all(error is not None and error.code == SHUTTING_DOWN for error in errors):
        return False
    return idempotent or all(error.data == NOT_STARTED for error in errors)  # type: ignore[union-attr]


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} {value!r} is invalid; give a positive number")


def _params_of(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Params:
    if args and kwargs:
        raise TypeError(
            f"call to {method!r} mixes positional and keyword arguments; JSON-RPC "
            "params are either an array or an object, so pass only one kind"
        )
    return dict(kwargs) if kwargs else list(args)


def _check_params(method: object, params: object) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method name {method!r} must be a string")
    if params is not None and not isinstance(params, (list, dict)):
        raise TypeError(f"params {params!r} of {method!r} must be a list, a dict or None")


def _encode(message: Any, what: str) -> bytes:
    try:
        return encode(encode_message(message))
    except EncodingError as error:
        raise EncodingError(f"cannot encode the params of {what} as JSON: {error}") from None


def _batch_label(methods: list[str]) -> str:
    shown = ", ".join(repr(method) for method in methods[:3])
    more = ", ..." if len(methods) > 3 else ""
    return f"batch of {plural(len(methods), 'call')} ({shown}{more})"


def _batch_values(label: str, ids: tuple[int, ...], responses: list[Response]) -> list[Any]:
    # One value per call of the batch, in the order the calls were given.
    by_id = {response.id: response for response in responses}
    values: list[Any] = []
    for position, request_id in enumerate(ids):
        response = by_id.get(request_id)
        if response is None:
            values.append(
                RemoteProtocolError(f"the reply to {label} has no entry for call {position}")
            )
        elif response.error is not None:
            values.append(response.error)
        else:
            values.append(response.result)
    return values

