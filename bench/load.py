"""
Client drivers: one process makes calls to one server for a fixed time and
prints one JSON line with the rate, latencies and CPU per call.

    python -m bench.load KIND --port N --pki DIR [--in-flight N]
        [--connections N] [--warmup S] [--seconds S] [--server-pid PID ...]
        [--proxy-pid PID ...]

Kinds on Twisted (this module): ``netrpc`` (the async client),
``bound-raw`` and ``bound-json`` (a minimal pipelining netstring client),
``stock-netstring`` (txJSON-RPC 0.5's Proxy, a TLS connection per call),
``tutorial-https`` (txJSON-RPC 0.5's HTTPS Proxy with a client
certificate), ``handshake`` (connect, complete mutual TLS, close) and
``idle`` (hold many connections and report the server's memory). The
``blocking``, ``grpc-sync`` and ``grpc-aio`` kinds live in their own
modules and are dispatched from here.

``--in-flight`` callers each make one call at a time, spread over
``--connections`` connections where the kind keeps connections. The CPU
time of ``--server-pid`` and ``--proxy-pid`` processes is reported per call,
separately for servers and proxies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.meter import Window, process_rss_bytes
from bench.pki import BenchPKI

# The work of every call: echo this 40-byte string.
PAYLOAD = "netrpc-bench/echo-payload-40-bytes-long."
assert len(PAYLOAD) == 40

# Seconds past warm-up plus window after which a driver gives up, so a
# stuck peer never leaves a process behind.
EXTRA_TIME_LIMIT = 60.0

Call = Callable[[], Any]

TWISTED_KINDS = (
    "netrpc",
    "bound-raw",
    "bound-json",
    "stock-netstring",
    "tutorial-https",
    "handshake",
    "idle",
)
OTHER_KINDS = ("blocking", "grpc-sync", "grpc-aio")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("kind", choices=TWISTED_KINDS + OTHER_KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--server-pid", type=int, action="append", default=[])
    parser.add_argument(
        "--proxy-pid",
        type=int,
        action="append",
        default=[],
        help="a proxy between client and server, whose CPU time per call is reported separately",
    )
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument(
        "--expect-forbidden",
        metavar="METHOD",
        help="netrpc kind: first check that calling METHOD is denied by the access policy",
    )
    return parser.parse_args(argv)


# --- Twisted callers, one per kind --------------------------------------


def _netrpc_callers(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer

    from netrpc.client import connect_mtls

    @defer.inlineCallbacks
    def connect_all() -> Any:
        callers = []
        for _ in range(options.connections):
            client = yield connect_mtls(
                reactor,
                "127.0.0.1",
                options.port,
                cert=pki.client_cert,
                key=pki.client_key,
                ca=pki.server_ca,
            )
            if options.expect_forbidden:
                yield _check_forbidden(client, options.expect_forbidden)
            callers.append(_bind_call(client.call, "echo", PAYLOAD))
        return callers

    return connect_all()


def _check_forbidden(client: Any, method: str) -> Any:
    from netrpc.exceptions import RemoteError
    from netrpc.jsonrpc import FORBIDDEN

    def denied(failure: Any) -> None:
        failure.trap(RemoteError)
        if failure.value.code != FORBIDDEN:
            raise ValueError(f"{method} failed with {failure.value!r}, expected FORBIDDEN")

    def allowed(result: Any) -> None:
        raise ValueError(f"{method} was allowed; the access policy is not enforced")

    return client.call(method, 6, 7).addCallbacks(allowed, denied)


def _bind_call(function: Callable[..., Any], *args: Any) -> Call:
    return lambda: function(*args)


class _Pipelined:
    """A netstring connection whose replies come back in request order."""

    def __init__(self) -> None:
        from twisted.protocols.basic import NetstringReceiver

        owner = self

        class Receiver(NetstringReceiver):
            MAX_LENGTH = 1024 * 1024

            def stringReceived(self, string: bytes) -> None:
                owner.waiting.popleft().callback(string)

        self.protocol = Receiver()
        self.waiting: deque[Any] = deque()

    def request(self, payload: bytes) -> Any:
        from twisted.internet.defer import Deferred

        reply: Deferred[bytes] = Deferred()
        self.waiting.append(reply)
        self.protocol.sendString(payload)
        return reply


def _connect_pipelined(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

    from bench import rawtls

    endpoint = wrapClientTLS(
        rawtls.client_options(pki), TCP4ClientEndpoint(reactor, "127.0.0.1", options.port)
    )
    connection = _Pipelined()
    connected = connectProtocol(endpoint, connection.protocol)
    return connected.addCallback(lambda _: connection)


def _json_call(connection: _Pipelined) -> Call:
    counter = iter(range(1, 1 << 62))

    def check(reply: bytes, request_id: int) -> Any:
        message = json.loads(reply)
        if message.get("id") != request_id or message.get("result") != PAYLOAD:
            raise ValueError(f"unexpected reply {reply[:200]!r}")
        return message["result"]

    def call() -> Any:
        request_id = next(counter)
        request = {"jsonrpc": "2.0", "method": "echo", "params": [PAYLOAD], "id": request_id}
        sent = connection.request(json.dumps(request, separators=(",", ":")).encode())
        return sent.addCallback(check, request_id)

    return call


def _raw_call(connection: _Pipelined) -> Call:
    payload = PAYLOAD.encode()
    return lambda: connection.request(payload)


def _bound_callers(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer

    make = _json_call if options.kind == "bound-json" else _raw_call

    @defer.inlineCallbacks
    def connect_all() -> Any:
        callers = []
        for _ in range(options.connections):
            connection = yield _connect_pipelined(reactor, options, pki)
            callers.append(make(connection))
        return callers

    return connect_all()


def _stock_callers(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer
    from txjsonrpc import jsonrpclib
    from txjsonrpc.netstring.jsonrpc import Proxy

    context = _tutorial_client_context(pki)()

    class TLSProxy(Proxy):  # type: ignore[misc]
        """The stock Proxy, connecting with TLS where it would use plain TCP."""

        def callRemote(self, method: str, *args: Any, **kwargs: Any) -> Any:
            version = self._getVersion(kwargs)
            factory = self._getFactoryClass(kwargs)(method, version, *args)
            reactor.connectSSL(self.host, self.port, factory, context)
            return factory.deferred

    proxy = TLSProxy("127.0.0.1", options.port, version=jsonrpclib.VERSION_2)
    return defer.succeed([_bind_call(proxy.callRemote, "echo", PAYLOAD)])


def _tutorial_client_context(pki: BenchPKI) -> type:
    """Return a client context factory class that loads the client certificate, as the tutorial does."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    class ClientCertificateContext(ssl.ClientContextFactory):  # type: ignore[misc]
        def getContext(self) -> SSL.Context:
            context = ssl.ClientContextFactory.getContext(self)
            context.use_certificate_file(str(pki.client_cert))
            context.use_privatekey_file(str(pki.client_key))
            return context

    return ClientCertificateContext


def _tutorial_callers(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer
    from txjsonrpc import jsonrpclib
    from txjsonrpc.web.jsonrpc import Proxy

    proxy = Proxy(
        f"https://127.0.0.1:{options.port}/",
        version=jsonrpclib.VERSION_2,
        ssl_ctx_factory=_tutorial_client_context(pki),
    )
    return defer.succeed([_bind_call(proxy.callRemote, "echo", PAYLOAD)])


def _handshake_callers(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.error import ConnectionDone
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import Protocol
    from zope.interface import implementer

    from bench import rawtls

    endpoint = wrapClientTLS(
        rawtls.client_options(pki), TCP4ClientEndpoint(reactor, "127.0.0.1", options.port)
    )

    @implementer(IHandshakeListener)
    class Handshake(Protocol):
        """Close as soon as the handshake completes; fail unless both ends agreed."""

        def __init__(self) -> None:
            self.closed: defer.Deferred[None] = defer.Deferred()
            self.completed = False

        def handshakeCompleted(self) -> None:
            self.completed = True
            self.transport.loseConnection()

        def connectionLost(self, reason: Any) -> None:
            # With TLS 1.3 the server checks the client certificate after
            # the client's side completed: a rejection shows up here.
            if self.completed and reason.check(ConnectionDone):
                self.closed.callback(None)
            else:
                self.closed.errback(reason)

    def call() -> Any:
        handshake = Handshake()
        connected = connectProtocol(endpoint, handshake)
        return connected.addCallback(lambda _: handshake.closed)

    return defer.succeed([call])


CALLERS = {
    "netrpc": _netrpc_callers,
    "bound-raw": _bound_callers,
    "bound-json": _bound_callers,
    "stock-netstring": _stock_callers,
    "tutorial-https": _tutorial_callers,
    "handshake": _handshake_callers,
}


# --- Running ------------------------------------------------------------


def _worker(call: Call, window: Window) -> Any:
    from twisted.internet import defer

    @defer.inlineCallbacks
    def loop() -> Any:
        while not window.done:
            started = time.perf_counter()
            yield call()
            window.record(started, time.perf_counter())

    return loop()


def _run_calls(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    from twisted.internet import defer

    @defer.inlineCallbacks
    def run() -> Any:
        callers = yield CALLERS[options.kind](reactor, options, pki)
        window = Window(options.warmup, options.seconds, options.server_pid, options.proxy_pid)
        yield defer.gatherResults(
            [_worker(callers[i % len(callers)], window) for i in range(options.in_flight)]
        )
        print(window.result().to_json(), flush=True)

    return run()


def _run_idle(reactor: Any, options: argparse.Namespace, pki: BenchPKI) -> Any:
    """Open ``--idle-connections`` connections, one call each, and report the server's RSS."""
    from twisted.internet import defer, task

    (server_pid,) = options.server_pid
    request = json.dumps(
        {"jsonrpc": "2.0", "method": "echo", "params": [PAYLOAD], "id": 1}
    ).encode()

    @defer.inlineCallbacks
    def open_one() -> Any:
        connection = yield _connect_pipelined(reactor, options, pki)
        yield connection.request(request)
        return connection

    @defer.inlineCallbacks
    def run() -> Any:
        warm = yield open_one()
        yield task.deferLater(reactor, 0.5, lambda: None)
        before = process_rss_bytes(server_pid)
        held = []
        # A few handshakes at a time, as clients arriving over a while would.
        for _ in range(0, options.idle_connections, 25):
            batch = min(25, options.idle_connections - len(held))
            held += yield defer.gatherResults([open_one() for _ in range(batch)])
        yield task.deferLater(reactor, 1.0, lambda: None)
        after = process_rss_bytes(server_pid)
        print(
            json.dumps({"connections": len(held), "rss_before": before, "rss_after": after}),
            flush=True,
        )
        for connection in held + [warm]:
            connection.protocol.transport.abortConnection()

    return run()


def run_twisted(options: argparse.Namespace) -> int:
    from twisted.internet import reactor

    pki = BenchPKI(options.pki)
    outcome: list[Any] = []
    run = _run_idle if options.kind == "idle" else _run_calls
    limit = reactor.callLater(options.warmup + options.seconds + EXTRA_TIME_LIMIT, reactor.stop)

    def finish(result: Any) -> None:
        outcome.append(result)
        if limit.active():
            limit.cancel()
        reactor.stop()

    reactor.callWhenRunning(lambda: run(reactor, options, pki).addBoth(finish))
    reactor.run()
    if not outcome:
        print(f"{options.kind}: gave up after the time limit", file=sys.stderr)
        return 1
    if hasattr(outcome[0], "getTraceback"):
        print(outcome[0].getTraceback(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    if options.kind == "blocking":
        from bench import blocking_load

        return blocking_load.run(options, PAYLOAD)
    if options.kind.startswith("grpc-"):
        from bench import grpc_peer

        return grpc_peer.run_client(options, PAYLOAD)
    return run_twisted(options)


if __name__ == "__main__":
    sys.exit(main())
