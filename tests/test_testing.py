"""Tests for netrpc.testing: the in-memory server for testing services."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import NetstringReceiver

from netrpc import jsonrpc
from netrpc.exceptions import RemoteError
from netrpc.testing import TEST_CALLER, MemoryServer


class RecordingClient(NetstringReceiver):
    """Records netstrings received and whether the connection closed."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def stringReceived(self, string: bytes) -> None:
        self.received.append(string)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def connect_raw(server: MemoryServer) -> RecordingClient:
    client: list[RecordingClient] = []
    server.endpoint.connect(Factory.forProtocol(RecordingClient)).addCallback(client.append)
    return client[0]


def request(method: str, params: Any, request_id: Any) -> bytes:
    return jsonrpc.encode_message(jsonrpc.build_request(method, params, request_id))


@pytest_twisted.inlineCallbacks
def test_client_calls_demo() -> Any:
    server = MemoryServer()
    client = yield server.connect_client()
    assert (yield client.call("multiply", 6, 7)) == 42
    assert (yield client.call("whoami")) == TEST_CALLER.as_dict()
    yield client.close()


@pytest_twisted.inlineCallbacks
def test_client_gets_errors() -> Any:
    server = MemoryServer(["netrpc.demo"])
    client = yield server.connect_client()
    with pytest.raises(RemoteError) as caught:
        yield client.call("multiply", 1)
    assert caught.value.code == jsonrpc.INVALID_PARAMS
    yield client.close()


def test_delivery_on_next_turn() -> None:
    """Bytes arrive when the clock turns, not during the write."""
    clock = Clock()
    server = MemoryServer(reactor=clock)
    client = connect_raw(server)
    client.sendString(request("echo", ["hi"], 1))
    assert client.received == []
    clock.advance(0)
    assert [jsonrpc.parse_response(data)[0].result for data in client.received] == ["hi"]


def test_pause_holds_bytes() -> None:
    clock = Clock()
    server = MemoryServer(reactor=clock)
    client = connect_raw(server)
    client.transport.pauseProducing()
    client.sendString(request("echo", ["held"], 1))
    clock.advance(0)
    assert client.received == []
    client.transport.resumeProducing()
    clock.advance(0)
    assert len(client.received) == 1


def test_close_delivers_pending_bytes() -> None:
    clock = Clock()
    server = MemoryServer(reactor=clock)
    client = connect_raw(server)
    client.sendString(request("echo", ["last"], 1))
    clock.advance(0)
    (connection,) = server.factory.connections
    connection.transport.loseConnection()
    clock.advance(0)
    assert len(client.received) == 1
    assert client.lost
    assert not server.factory.connections


def test_server_limits_apply() -> None:
    clock = Clock()
    server = MemoryServer(reactor=clock, call_timeout=2)
    client = connect_raw(server)
    client.sendString(request("sleep", [5], "slow"))
    clock.advance(0)
    clock.advance(2)
    clock.advance(0)
    (reply,) = jsonrpc.parse_response(client.received[0])
    assert reply.error is not None
    assert reply.error.code == jsonrpc.CALL_TIMEOUT


def test_custom_caller() -> None:
    clock = Clock()
    server = MemoryServer(reactor=clock, caller=None)
    client = connect_raw(server)
    client.sendString(request("whoami", None, 1))
    clock.advance(0)
    assert jsonrpc.parse_response(client.received[0])[0].result is None
