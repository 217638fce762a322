"""
The ``blocking`` kind of ``bench.load``: netrpc's blocking client, one call
after another on one connection, from plain Python without a reactor.
"""

from __future__ import annotations

import argparse
import time

from bench.meter import Window
from bench.pki import BenchPKI


def run(options: argparse.Namespace, payload: str) -> int:
    """Run the load and print its result line."""
    from netrpc.blocking import Client

    pki = BenchPKI(options.pki)
    window = Window(options.warmup, options.seconds, options.server_pid)
    client = Client(
        "127.0.0.1", options.port, cert=pki.client_cert, key=pki.client_key, ca=pki.server_ca
    )
    try:
        while not window.done:
            started = time.perf_counter()
            if client.call("echo", payload) != payload:
                raise ValueError("the blocking client's echo returned another value")
            window.record(started, time.perf_counter())
    finally:
        client.close()
    print(window.result().to_json(), flush=True)
    return 0
