"""
Tests for netrpc.gate: the access policy, per-identity caps, audit lines and
counters, on server connections over in-memory transports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import compute_service
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import capturedLogs, formatEvent

from netrpc import jsonrpc
from netrpc.audit import AuditLog, AuditRecord, AuditSettings, format_json, format_text
from netrpc.framing import NetstringDecoder, encode
from netrpc.gate import CallGate
from netrpc.identity import PeerIdentity
from netrpc.methods import MethodRegistry, build_registry
from netrpc.policy import Policy, Rule
from netrpc.protocol import RPCServerFactory, RPCServerProtocol
from netrpc.system import SystemHandler

ALICE = PeerIdentity("alice", serial=0xA1)
BOB = PeerIdentity("bob", serial=0xB0)
CAROL = PeerIdentity("carol", serial=0xC0)
POLICY = Policy(
    (
        Rule(("alice",), ("compute.*", "system.listMethods", "wait"), max_connections=2, max_in_flight=2),
        Rule(("bob",), ("system.health",)),
        Rule(("carol",), ("compute.*", "wait"), max_connections=1, max_in_flight=1),
    )
)


class Peer:
    """One client connection of ``identity``, on an in-memory transport."""

    ports = iter(range(40000, 50000))

    def __init__(self, registry: MethodRegistry, gate: CallGate, clock: Any, identity: PeerIdentity) -> None:
        factory = RPCServerFactory(registry, reactor=clock, observer=gate, default_caller=identity)
        address = IPv4Address("TCP", "127.0.0.1", next(self.ports))
        self.transport = StringTransportWithDisconnection(peerAddress=address)
        protocol = factory.buildProtocol(address)
        assert isinstance(protocol, RPCServerProtocol)
        self.protocol = protocol
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        protocol.handshakeCompleted()

    def call(self, method: str, params: Any = None, request_id: int = 1) -> None:
        request = jsonrpc.build_request(method, params, request_id)
        self.protocol.dataReceived(encode(json.dumps(request).encode()))

    def replies(self) -> list[Any]:
        frames = NetstringDecoder(10**9).feed(self.transport.value())
        self.transport.clear()
        return [json.loads(frame) for frame in frames]

    def reply(self, method: str, params: Any = None) -> Any:
        self.call(method, params)
        (only,) = self.replies()
        return only

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    def close(self) -> None:
        self.transport.loseConnection()


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def waiting() -> list[Deferred[Any]]:
    return []


@pytest.fixture
def gate(clock: MemoryReactorClock) -> CallGate:
    return CallGate(POLICY, clock=clock, audit=AuditLog(AuditSettings()))


@pytest.fixture
def registry(gate: CallGate, clock: MemoryReactorClock, waiting: list[Deferred[Any]]) -> MethodRegistry:
    registry = build_registry(["compute_service:Service"])

    def wait() -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred()
        waiting.append(deferred)
        return deferred

    registry.add_function("wait", wait)
    system = SystemHandler(
        registry, instance="", started=0.0, clock=clock, stats=lambda: {}, access_of=gate.access_of
    )
    registry.putSubHandler("system", system)
    return registry


@pytest.fixture
def connect(registry: MethodRegistry, gate: CallGate, clock: MemoryReactorClock) -> Any:
    def make(identity: PeerIdentity) -> Peer:
        return Peer(registry, gate, clock, identity)

    return make


@pytest.fixture(autouse=True)
def forget_runs() -> Iterator[None]:
    compute_service.ran.clear()
    yield
    compute_service.ran.clear()


class TestPolicy:
    def test_allowed(self, connect: Any) -> None:
        assert connect(ALICE).reply("compute.add", [2, 3])["result"] == 5

    def test_forbidden(self, connect: Any) -> None:
        """A call outside the policy gets FORBIDDEN and its method never runs."""
        reply = connect(BOB).reply("compute.add", [2, 3])
        assert reply["error"] == {"code": jsonrpc.FORBIDDEN, "message": "forbidden"}
        assert reply["id"] == 1
        assert compute_service.ran == []

    def test_unknown_method_forbidden(self, connect: Any) -> None:
        """A name outside the policy is rejected before lookup, so it does not reveal what exists."""
        assert connect(BOB).reply("no.such")["error"]["code"] == jsonrpc.FORBIDDEN
        assert connect(ALICE).reply("compute.nothing")["error"]["code"] == jsonrpc.METHOD_NOT_FOUND

    def test_public_health(self, connect: Any) -> None:
        assert connect(ALICE).reply("system.health")["result"]["status"] == "serving"

    def test_stranger(self, connect: Any) -> None:
        stranger = connect(PeerIdentity("mallory"))
        assert stranger.reply("system.health")["result"]["status"] == "serving"
        assert stranger.reply("ping")["error"]["code"] == jsonrpc.FORBIDDEN

    def test_list_methods_filtered(self, connect: Any) -> None:
        names = connect(ALICE).reply("system.listMethods")["result"]
        assert names == ["compute.add", "compute.sleep", "system.health", "system.listMethods", "wait"]

    def test_list_methods_forbidden(self, connect: Any) -> None:
        assert connect(BOB).reply("system.listMethods")["error"]["code"] == jsonrpc.FORBIDDEN

    def test_method_help_of_forbidden_method(self, registry: MethodRegistry, gate: CallGate, clock: Any) -> None:
        gate.policy = Policy((Rule(("alice",), ("system.methodHelp", "compute.add")),))
        alice = Peer(registry, gate, clock, ALICE)
        assert alice.reply("system.methodHelp", ["compute.add"])["result"] == "Return the sum of ``a`` and ``b``."
        assert alice.reply("system.methodHelp", ["ping"])["error"]["code"] == jsonrpc.FORBIDDEN
        assert alice.reply("system.methodHelp", [5])["error"]["code"] == jsonrpc.INVALID_PARAMS

    def test_batch(self, connect: Any) -> None:
        bob = connect(BOB)
        batch = [jsonrpc.build_request("system.health", [], 1), jsonrpc.build_request("ping", [], 2)]
        bob.protocol.dataReceived(encode(json.dumps(batch).encode()))
        (replies,) = bob.replies()
        by_id = {reply["id"]: reply for reply in replies}
        assert "result" in by_id[1]
        assert by_id[2]["error"]["code"] == jsonrpc.FORBIDDEN

    def test_forbidden_notification(self, connect: Any) -> None:
        bob = connect(BOB)
        notification = jsonrpc.build_notification("ping", [])
        bob.protocol.dataReceived(encode(json.dumps(notification).encode()))
        assert bob.replies() == []
        assert compute_service.ran == []

    def test_rejection_logged(self, connect: Any) -> None:
        with capturedLogs() as events:
            connect(BOB).reply("compute.add", [1, 2])
        texts = [formatEvent(event) for event in events if event["log_namespace"] == "netrpc.policy"]
        assert len(texts) == 1
        assert "'compute.add'" in texts[0]
        assert "'bob' (serial B0)" in texts[0]

    def test_no_policy(self, connect: Any, gate: CallGate) -> None:
        gate.policy = None
        stranger = connect(PeerIdentity("mallory"))
        assert stranger.reply("ping")["result"] == "pong"
        assert "compute.add" in stranger.reply("system.listMethods")["result"]


class TestCaps:
    def test_max_connections(self, connect: Any, gate: CallGate) -> None:
        first, second = connect(ALICE), connect(ALICE)
        with capturedLogs() as events:
            third = connect(ALICE)
        assert third.closed
        assert not first.closed
        assert not second.closed
        assert any("already has 2 connections open" in formatEvent(event) for event in events)
        assert gate.stats.connections_over_cap == 1

    def test_max_connections_freed(self, connect: Any) -> None:
        first, _ = connect(ALICE), connect(ALICE)
        first.close()
        assert not connect(ALICE).closed

    def test_caps_of_one_in_singular(self, connect: Any, waiting: list[Deferred[Any]]) -> None:
        first = connect(CAROL)
        with capturedLogs() as events:
            assert connect(CAROL).closed
        assert any("already has 1 connection open" in formatEvent(event) for event in events)

        first.call("wait", [], 1)
        reply = first.reply("compute.add", [1, 1])
        assert "already has 1 call in flight" in reply["error"]["data"]
        waiting[0].callback("done")

    def test_max_connections_per_identity(self, connect: Any) -> None:
        """Alice's cap does not limit Bob."""
        connect(ALICE), connect(ALICE)
        assert not connect(BOB).closed

    def test_max_in_flight(self, connect: Any, waiting: list[Deferred[Any]]) -> None:
        """The cap counts calls across all of an identity's connections."""
        first, second = connect(ALICE), connect(ALICE)
        first.call("wait", [], 1)
        second.call("wait", [], 2)
        reply = second.reply("compute.add", [1, 1])
        assert reply["error"]["code"] == jsonrpc.OVERLOADED
        assert "max_in_flight" in reply["error"]["data"]

        waiting[0].callback("done")
        assert first.replies()[0]["result"] == "done"
        assert second.reply("compute.add", [1, 1])["result"] == 2


class TestRecords:
    def test_audit_line_per_call(self, connect: Any) -> None:
        alice = connect(ALICE)
        with capturedLogs() as events:
            alice.reply("compute.add", [2, 3])
            alice.reply("ping")
        lines = [event["audit_line"] for event in events if event["log_namespace"] == "netrpc.audit"]
        assert len(lines) == 2
        assert "identity=alice serial=A1 method=compute.add outcome=ok" in lines[0]
        assert f"peer={alice.protocol.peer} " in lines[0]
        assert "method=ping outcome=error code=-32003" in lines[1]

    @pytest.mark.parametrize("form", ["text", "json"])
    def test_audit_lines_of_one_connection(
        self, registry: MethodRegistry, clock: MemoryReactorClock, form: str
    ) -> None:
        """Lines formatted with the connection's cached caller fields match those formatted afresh."""
        gate = CallGate(None, clock=clock, audit=AuditLog(AuditSettings(format=form)))
        alice = Peer(registry, gate, clock, PeerIdentity("alice smith", serial=0xA1))
        with capturedLogs() as events:
            alice.reply("compute.add", [2, 3])
            alice.reply("compute.missing")
        lines = [event["audit_line"] for event in events if event["log_namespace"] == "netrpc.audit"]

        def line(method: str, reply: jsonrpc.Reply) -> str:
            record = AuditRecord(
                clock.seconds(), alice.protocol.peer, alice.protocol.caller, method, None, reply, 0.0
            )
            return (format_json if form == "json" else format_text)(record)

        assert lines == [
            line("compute.add", jsonrpc.result_reply(1, 5)),
            line("compute.missing", jsonrpc.error_reply(1, jsonrpc.METHOD_NOT_FOUND)),
        ]

    def test_lost_call_audited(self, connect: Any, waiting: list[Deferred[Any]]) -> None:
        alice = connect(ALICE)
        alice.call("wait")
        with capturedLogs() as events:
            alice.close()
        lines = [event["audit_line"] for event in events if event["log_namespace"] == "netrpc.audit"]
        assert len(lines) == 1
        assert "method=wait outcome=lost" in lines[0]

    def test_counters(self, connect: Any, gate: CallGate, waiting: list[Deferred[Any]]) -> None:
        alice, bob = connect(ALICE), connect(BOB)
        alice.reply("compute.add", [1, 2])
        bob.reply("ping")
        alice.call("wait")
        assert gate.stats.calls == 2
        assert gate.stats.errors == {jsonrpc.FORBIDDEN: 1}
        assert gate.calls_in_flight == 1
        assert gate.open_connections == 2

        waiting[0].callback(None)
        alice.close()
        assert gate.calls_in_flight == 0
        assert gate.open_connections == 1
        assert gate.stats.calls == 3


class TestReload:
    def test_rule_removed(self, connect: Any, gate: CallGate) -> None:
        """A connection whose identity lost its rule is returned for closing; others are not."""
        alice, bob = connect(ALICE), connect(BOB)
        to_close = gate.replace_policy(Policy((Rule(("bob",), ("system.health",)),)))
        assert [connection for connection, _ in to_close] == [alice.protocol]
        assert "no rule" in to_close[0][1]
        assert bob.reply("system.health")["result"]["status"] == "serving"

    def test_new_rules_apply_to_open_connections(self, connect: Any, gate: CallGate) -> None:
        bob = connect(BOB)
        assert gate.replace_policy(Policy((Rule(("bob",), ("ping",)),))) == []
        assert bob.reply("ping")["result"] == "pong"

    def test_policy_removed(self, connect: Any, gate: CallGate) -> None:
        bob = connect(BOB)
        assert gate.replace_policy(None) == []
        assert bob.reply("compute.add", [1, 1])["result"] == 2
