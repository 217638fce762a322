"""
A stdlib ``ssl`` server on loopback, in background threads, whose every
reply a test scripts. Tests of the blocking client use it for servers that
misbehave on purpose: they never reply, reply late or with a wrong id, or
present a certificate the client must reject.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from netrpc.framing import NetstringDecoder, encode

# Upper bound for any wait in these helpers, in seconds, so a broken test
# fails instead of hanging.
WAIT = 10.0

# How often the accept loop checks whether it should stop, in seconds.
_POLL = 0.05


class ServerConnection:
    """One accepted connection, with netstring reading and writing helpers."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._decoder = NetstringDecoder(1 << 20)
        self._frames: list[bytes] = []

    def read_message(self) -> Any:
        """Return the next request message, decoded from JSON; None when the peer closed."""
        while not self._frames:
            data = self.socket.recv(65536)
            if not data:
                return None
            self._frames.extend(self._decoder.feed(data))
        return json.loads(self._frames.pop(0))

    def send_message(self, message: Any) -> None:
        """Send ``message`` as JSON in one netstring."""
        self.socket.sendall(encode(json.dumps(message).encode()))

    def send_raw(self, data: bytes) -> None:
        """Send ``data`` as it is."""
        self.socket.sendall(data)

    def wait_for_close(self) -> None:
        """Read and discard until the peer closes or ``WAIT`` passes."""
        try:
            while self.socket.recv(65536):
                pass
        except OSError:
            pass


Handler = Callable[[ServerConnection], None]


class ScriptedServer:
    """
    Listen on 127.0.0.1 at a port the kernel picks, complete the TLS
    handshake of each connection, and run ``handler`` on it in a thread.

    With ``client_ca`` the server requires a client certificate issued by
    it; with ``tls`` false it speaks plain TCP, so a TLS client's handshake
    never completes. ``configure`` may change the TLS context, such as its
    protocol versions or ciphers. Handshake failures are kept in ``handshake_errors`` and
    handler failures in ``handler_errors``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        client_ca: Path | None = None,
        tls: bool = True,
        configure: Callable[[ssl.SSLContext], None] | None = None,
    ) -> None:
        self._handler = handler
        self._context = _server_context(cert, key, client_ca) if tls else None
        if self._context is not None and configure is not None:
            configure(self._context)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.handshake_errors: list[BaseException] = []
        self.handler_errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, close every connection and join the threads."""
        self._stopping.set()
        self._accept_thread.join(WAIT)
        self._listener.close()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(WAIT)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            raw.settimeout(WAIT)
            self._sockets.append(raw)
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        if self._context is not None:
            try:
                sock = self._context.wrap_socket(raw, server_side=True)
            except (OSError, ValueError) as error:
                self.handshake_errors.append(error)
                raw.close()
                return
            self._sockets.append(sock)
        try:
            self._handler(ServerConnection(sock))
        except OSError:
            # The client closing or the server shutting down ends a handler.
            pass
        except BaseException as error:
            self.handler_errors.append(error)
        finally:
            sock.close()


def _server_context(cert: Path | None, key: Path | None, client_ca: Path | None) -> ssl.SSLContext:
    if cert is None or key is None:
        raise ValueError("a TLS server needs cert and key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context
