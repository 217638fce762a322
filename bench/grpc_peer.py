"""
gRPC Python with mutual TLS, the peer most users would pick instead.

One unary method, ``/bench.Echo/Echo``, registered through a generic
handler with no serializers, so requests and replies are raw bytes and no
protobuf code is involved. Server: ``python -m bench.grpc_peer sync|aio
--pki DIR``; it logs ``Listening on 127.0.0.1 port N`` and runs until
SIGTERM. The clients are the ``grpc-sync`` and ``grpc-aio`` kinds of
``bench.load``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench.meter import Window
from bench.pki import BenchPKI

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"
INTERFACE = "127.0.0.1"

# The sync server runs each call on a pool thread; enough threads that 32
# calls in flight never wait for one.
SYNC_SERVER_THREADS = 32

# The certificate names localhost and 127.0.0.1; name the one to check.
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", "localhost")]

# Seconds before one call fails, so a stuck server ends the run.
CALL_TIMEOUT = 30.0


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _server_credentials(pki: BenchPKI) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(pki.server_key), _read(pki.server_cert))],
        root_certificates=_read(pki.client_ca),
        require_client_auth=True,
    )


def _channel_credentials(pki: BenchPKI) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(pki.server_ca),
        private_key=_read(pki.client_key),
        certificate_chain=_read(pki.client_cert),
    )


def _announce(port: int) -> None:
    print(f"Listening on {INTERFACE} port {port}", flush=True)


# --- Servers ------------------------------------------------------------


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _echo_async(request: bytes, context: Any) -> bytes:
    return request


def _handler(behaviour: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


def serve_sync(pki: BenchPKI) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_SERVER_THREADS))
    server.add_generic_rpc_handlers((_handler(_echo),))
    port = server.add_secure_port(f"{INTERFACE}:0", _server_credentials(pki))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    server.start()
    _announce(port)
    stopping.wait()
    server.stop(1).wait()


async def serve_aio(pki: BenchPKI) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(_echo_async),))
    port = server.add_secure_port(f"{INTERFACE}:0", _server_credentials(pki))
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await server.start()
    _announce(port)
    await stopping.wait()
    await server.stop(1)


# --- Clients ------------------------------------------------------------


def _sync_client(options: argparse.Namespace, payload: bytes, window: Window) -> None:
    target = f"{INTERFACE}:{options.port}"
    with grpc.secure_channel(target, _channel_credentials(options.pki_paths), CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD)
        # Futures keep ``in_flight`` calls outstanding from one thread;
        # they are collected oldest first.
        pending: collections.deque[tuple[float, Any]] = collections.deque()
        while not window.done:
            while len(pending) < options.in_flight:
                pending.append((time.perf_counter(), call.future(payload, timeout=CALL_TIMEOUT)))
            started, future = pending.popleft()
            if future.result() != payload:
                raise ValueError("gRPC echo returned other bytes")
            window.record(started, time.perf_counter())
        for _, future in pending:
            future.result()


async def _aio_client(options: argparse.Namespace, payload: bytes, window: Window) -> None:
    target = f"{INTERFACE}:{options.port}"
    async with grpc.aio.secure_channel(
        target, _channel_credentials(options.pki_paths), CHANNEL_OPTIONS
    ) as channel:
        call = channel.unary_unary(METHOD)

        async def worker() -> None:
            while not window.done:
                started = time.perf_counter()
                if await call(payload, timeout=CALL_TIMEOUT) != payload:
                    raise ValueError("gRPC echo returned other bytes")
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(options.in_flight)))


def run_client(options: argparse.Namespace, payload: str) -> int:
    """Run the ``grpc-sync`` or ``grpc-aio`` load and print its result line."""
    options.pki_paths = BenchPKI(options.pki)
    data = payload.encode()
    window = Window(options.warmup, options.seconds, options.server_pid)
    if options.kind == "grpc-sync":
        _sync_client(options, data, window)
    else:
        asyncio.run(_aio_client(options, data, window))
    print(window.result().to_json(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_peer")
    parser.add_argument("mode", choices=["sync", "aio"])
    parser.add_argument("--pki", type=Path, required=True)
    options = parser.parse_args(argv)
    pki = BenchPKI(options.pki)
    if options.mode == "sync":
        serve_sync(pki)
    else:
        asyncio.run(serve_aio(pki))
    return 0


if __name__ == "__main__":
    sys.exit(main())
