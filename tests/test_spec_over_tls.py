"""
The server over real mutual TLS on loopback: the examples of section 7 of
the JSON-RPC 2.0 specification through ``mtls:`` endpoints, the caller's
identity from its certificate, and the stock txJSON-RPC netstring client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import spec_service
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from txjsonrpc_ng import jsonrpclib
from txjsonrpc_ng.jsonrpclib import Fault
from txjsonrpc_ng.netstring.jsonrpc import Proxy, QueryFactory

from netrpc import jsonrpc
from netrpc.certs import PKI
from netrpc.methods import build_registry
from netrpc.protocol import CLOSE_TIMEOUT, RPCServerFactory
from netrpc.tls import ClientTLS
from netrpc.tlsfiles import TLSFiles

from tlstest import EchoClient, client_description, server_description, with_timeout


@pytest.fixture
def server_factory() -> RPCServerFactory:
    return RPCServerFactory(build_registry(["spec_service", "netrpc.demo"]))


@pytest.fixture
def server(pki: PKI, server_factory: RPCServerFactory) -> Iterator[int]:
    """Serve the specification's methods and the demo over mtls:; yield the port."""
    endpoint = serverFromString(reactor, server_description(pki))
    listening = pytest_twisted.blockon(endpoint.listen(server_factory))
    yield listening.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(listening.stopListening))
    pytest_twisted.blockon(server_factory.drain(1))


def connect(pki: PKI, port: int) -> defer.Deferred[EchoClient]:
    endpoint = clientFromString(reactor, client_description(pki, "alice", port))
    return with_timeout(endpoint.connect(Factory.forProtocol(EchoClient)))


@pytest.fixture
def client(pki: PKI, server: int) -> Iterator[EchoClient]:
    """A netstring client connected as alice; ``echo`` sends a frame and waits for the next reply."""
    connected = pytest_twisted.blockon(connect(pki, server))
    yield connected
    connected.transport.loseConnection()
    pytest_twisted.blockon(with_timeout(connected.closed))


SENTINEL = json.dumps(jsonrpc.build_request("echo", ["sentinel"], "sentinel")).encode()


@pytest.mark.parametrize(
    ("name", "sent", "expected"),
    spec_service.EXAMPLES,
    ids=[example[0] for example in spec_service.EXAMPLES],
)
@pytest_twisted.inlineCallbacks
def test_specification_example(client: EchoClient, name: str, sent: str, expected: Any) -> Any:
    client.sendString(sent.encode())
    # A call sent after the example proves that no reply came before it.
    reply = yield client.echo(SENTINEL)
    if expected is not None:
        assert spec_service.normalize(json.loads(reply)) == spec_service.normalize(expected)
        reply = yield with_timeout(client.replies.get())
    assert json.loads(reply) == jsonrpc.result_reply("sentinel", "sentinel")


@pytest_twisted.inlineCallbacks
def test_whoami_over_tls(client: EchoClient) -> Any:
    reply = yield client.echo(json.dumps(jsonrpc.build_request("whoami", None, 1)).encode())
    identity = json.loads(reply)["result"]
    assert identity["common_name"] == "alice"
    local = client.transport.getHost()
    assert identity["address"] == f"{local.host}:{local.port}"


@pytest_twisted.inlineCallbacks
def test_pipelined_calls(client: EchoClient) -> Any:
    """Many calls sent at once each get one reply with their own result."""
    for number in range(50):
        client.sendString(json.dumps(jsonrpc.build_request("multiply", [number, 2], number)).encode())
    replies = []
    for _ in range(50):
        replies.append(json.loads((yield with_timeout(client.replies.get()))))
    assert sorted((reply["id"], reply["result"]) for reply in replies) == [(n, 2 * n) for n in range(50)]


@pytest_twisted.inlineCallbacks
def test_drain_over_tls(pki: PKI, server: int, server_factory: RPCServerFactory) -> Any:
    """A drain lets a short call reply, stops a long one, then closes with close-notify."""
    client = yield connect(pki, server)
    client.sendString(json.dumps(jsonrpc.build_request("sleep", [0.2], "short")).encode())
    client.sendString(json.dumps(jsonrpc.build_request("sleep", [10], "long")).encode())
    yield client.echo(SENTINEL)

    drained = server_factory.drain(1)
    short = json.loads((yield with_timeout(client.replies.get())))
    long = json.loads((yield with_timeout(client.replies.get())))
    assert short == jsonrpc.result_reply("short", 0.2)
    assert long["id"] == "long"
    assert long["error"]["code"] == jsonrpc.SHUTTING_DOWN

    reason = yield with_timeout(client.closed)
    assert isinstance(reason, ConnectionDone)
    # Closed by the TLS close exchange, not aborted after CLOSE_TIMEOUT.
    yield with_timeout(drained, CLOSE_TIMEOUT - 1)


def stock_proxy(pki: PKI, port: int, client_name: str = "alice") -> Proxy:
    """
    Return the stock txJSON-RPC netstring ``Proxy`` in protocol version 2,
    each call wrapped in Twisted's TLS layer with netrpc's client context.
    """
    # NOTE: Twisted's own optionsForClientTLS would be the more independent
    # choice, but with pyOpenSSL 26 it passes X509 objects that pyOpenSSL
    # deprecates, and this suite turns warnings into errors.
    files = TLSFiles(
        private_key=pki.client_key(client_name),
        certificate=pki.client_cert(client_name),
        ca_certificates=pki.server_ca_cert,
    )
    creator = ClientTLS(files, "localhost")

    def tls_query_factory(method: str, version: int, *args: Any, **kwargs: Any) -> TLSMemoryBIOFactory:
        query = QueryFactory(method, version, *args, **kwargs)
        wrapped = TLSMemoryBIOFactory(creator, True, query)
        wrapped.deferred = query.deferred  # Proxy.callRemote returns factory.deferred.
        return wrapped

    return Proxy("127.0.0.1", port, version=jsonrpclib.VERSION_2, factoryClass=tls_query_factory)


@pytest_twisted.inlineCallbacks
def test_stock_txjsonrpc_client(pki: PKI, server: int) -> Any:
    proxy = stock_proxy(pki, server)

    assert (yield with_timeout(proxy.callRemote("multiply", 6, 7))) == 42
    assert (yield with_timeout(proxy.callRemote("subtract", minuend=42, subtrahend=23))) == 19
    assert (yield with_timeout(proxy.callRemote("echo", {"nested": [1, "two"]}))) == {"nested": [1, "two"]}
    assert (yield with_timeout(proxy.callRemote("whoami")))["common_name"] == "alice"
    assert "multiply" in (yield with_timeout(proxy.callRemote("system.listMethods")))


@pytest_twisted.inlineCallbacks
def test_stock_client_gets_errors(pki: PKI, server: int) -> Any:
    proxy = stock_proxy(pki, server)

    with pytest.raises(Fault) as unknown:
        yield with_timeout(proxy.callRemote("nope"))
    assert (unknown.value.faultCode, unknown.value.faultString) == (-32601, "Method not found")

    with pytest.raises(Fault) as invalid:
        yield with_timeout(proxy.callRemote("multiply", 1))
    assert invalid.value.faultCode == jsonrpc.INVALID_PARAMS


@pytest_twisted.inlineCallbacks
def test_stock_client_untrusted_rejected(pki: PKI, other_pki: PKI, server: int) -> Any:
    """The same stock client with a certificate from another CA gets no result."""
    trusted = stock_proxy(pki, server)
    assert (yield with_timeout(trusted.callRemote("echo", 1))) == 1

    # The stock client reports a connection closed without any reply as a
    # JSON error on the empty reply.
    untrusted = stock_proxy(other_pki, server)
    with pytest.raises(json.JSONDecodeError):
        yield with_timeout(untrusted.callRemote("echo", 1))
