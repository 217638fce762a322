"""
The Twisted peers that netrpc is measured against, one per process:

- ``bound-raw``: a netstring echo over mutual TLS, the least any design on
  Twisted can do per call;
- ``bound-json``: the same, reading each request and building its reply
  envelope with the stdlib ``json`` module, without method dispatch;
- ``stock-netstring``: txJSON-RPC 0.5's netstring server, unchanged, behind
  the TLS setup of the tutorial;
- ``tutorial-https``: txJSON-RPC 0.5's HTTP resource on a Twisted web site,
  behind the TLS setup of the tutorial.

Run as ``python -m bench.servers KIND --pki DIR``. Each logs ``Listening on
127.0.0.1 port N`` once it listens on an ephemeral port, and runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import protocol, reactor, ssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.protocols.basic import NetstringReceiver

from bench import rawtls
from bench.pki import BenchPKI

INTERFACE = "127.0.0.1"
MAX_MESSAGE_SIZE = 1024 * 1024


class RawEcho(NetstringReceiver):
    """Send every netstring back as it came."""

    MAX_LENGTH = MAX_MESSAGE_SIZE

    def stringReceived(self, string: bytes) -> None:
        self.sendString(string)


class JSONEcho(NetstringReceiver):
    """Answer a JSON-RPC request with its first param as the result."""

    MAX_LENGTH = MAX_MESSAGE_SIZE

    def stringReceived(self, string: bytes) -> None:
        request = json.loads(string)
        reply = {"jsonrpc": "2.0", "result": request["params"][0], "id": request["id"]}
        self.sendString(json.dumps(reply, separators=(",", ":")).encode())


def tutorial_context(pki: BenchPKI) -> ssl.DefaultOpenSSLContextFactory:
    """
    Server TLS as the well-known Twisted client-certificate tutorial builds
    it: the default context factory, then verification of the peer against
    the client CA switched on by hand.
    """
    factory = ssl.DefaultOpenSSLContextFactory(str(pki.server_key), str(pki.server_cert))
    context = factory.getContext()
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _keep_verdict)
    context.load_verify_locations(str(pki.client_ca))
    return factory


def _keep_verdict(connection: Any, x509: Any, errnum: int, depth: int, ok: int) -> bool:
    return bool(ok)


def _listen_bound(pki: BenchPKI, echo: type[protocol.Protocol]) -> Any:
    endpoint = SSL4ServerEndpoint(reactor, 0, rawtls.server_options(pki), interface=INTERFACE)
    return endpoint.listen(protocol.Factory.forProtocol(echo))


def _listen_stock_netstring(pki: BenchPKI) -> Any:
    from txjsonrpc import jsonrpclib
    from txjsonrpc.netstring.jsonrpc import JSONRPC, RPCFactory

    class Echo(JSONRPC):
        def __init__(self) -> None:
            super().__init__(version=jsonrpclib.VERSION_2)

        def jsonrpc_echo(self, value: Any) -> Any:
            return value

    factory = RPCFactory(Echo, maxLength=MAX_MESSAGE_SIZE)
    return reactor.listenSSL(0, factory, tutorial_context(pki), interface=INTERFACE)


def _listen_tutorial_https(pki: BenchPKI) -> Any:
    from twisted.web import server
    from txjsonrpc.web.jsonrpc import JSONRPC

    class Echo(JSONRPC):
        def jsonrpc_echo(self, value: Any) -> Any:
            return value

    site = server.Site(Echo())
    return reactor.listenSSL(0, site, tutorial_context(pki), interface=INTERFACE)


def _listen(kind: str, pki: BenchPKI) -> Any:
    if kind == "bound-raw":
        return _listen_bound(pki, RawEcho)
    if kind == "bound-json":
        return _listen_bound(pki, JSONEcho)
    if kind == "stock-netstring":
        return _listen_stock_netstring(pki)
    return _listen_tutorial_https(pki)


def _announce(port: Any) -> None:
    address = port.getHost()
    print(f"Listening on {address.host} port {address.port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["bound-raw", "bound-json", "stock-netstring", "tutorial-https"])
    parser.add_argument("--pki", type=Path, required=True)
    options = parser.parse_args(argv)

    listening = _listen(options.kind, BenchPKI(options.pki))
    if hasattr(listening, "addCallback"):
        listening.addCallback(_announce)
    else:
        _announce(listening)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
