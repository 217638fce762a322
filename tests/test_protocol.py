"""
Tests for netrpc.protocol: the server protocol over an in-memory transport,
with a fake clock for deadlines, idle time and shutdown.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import pytest
import spec_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import LogLevel, capturedLogs, formatEvent

from netrpc import jsonrpc
from netrpc.exceptions import RPCError
from netrpc.framing import NetstringDecoder, encode
from netrpc.identity import PeerIdentity
from netrpc.methods import MethodRegistry, build_registry
from netrpc.protocol import CLOSE_TIMEOUT, RPCServerFactory, RPCServerProtocol

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Controlled:
    """Methods whose Deferreds the test fires by hand, to order and overlap calls."""

    def __init__(self) -> None:
        self.pending: dict[str, Deferred[Any]] = {}
        self.cancelled: list[str] = []

    def wait(self, key: str) -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred(lambda d: self.cancelled.append(key))
        self.pending[key] = deferred
        return deferred

    def fire(self, key: str, result: Any = None) -> None:
        self.pending.pop(key).callback(key if result is None else result)


class Connection:
    """One server connection on an in-memory transport, with helpers to talk to it."""

    def __init__(self, factory: RPCServerFactory, peer: Any = PEER) -> None:
        self.factory = factory
        self.transport = StringTransportWithDisconnection(peerAddress=peer)
        protocol = factory.buildProtocol(peer)
        assert isinstance(protocol, RPCServerProtocol)
        self.protocol = protocol
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, message: Any) -> None:
        text = message if isinstance(message, (str, bytes)) else json.dumps(message)
        self.protocol.dataReceived(encode(text.encode() if isinstance(text, str) else text))

    def call(self, method: str, params: Any = None, request_id: Any = 1) -> None:
        self.send(jsonrpc.build_request(method, params, request_id))

    def replies(self) -> list[Any]:
        """Return the replies written since the last call, decoded."""
        frames = NetstringDecoder(10**9).feed(self.transport.value())
        self.transport.clear()
        return [json.loads(frame) for frame in frames]

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    @property
    def reading(self) -> bool:
        return self.transport.producerState == "producing"


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def controlled() -> Controlled:
    return Controlled()


@pytest.fixture
def registry(controlled: Controlled) -> MethodRegistry:
    registry = build_registry(["spec_service", "netrpc.demo"])
    registry.add_function("wait", controlled.wait)
    registry.add_function("fail", _fail)
    registry.add_function("unencodable", lambda: {"value": object()})
    registry.add_function("refuse", _refuse)
    return registry


def _fail() -> None:
    raise ValueError("secret internal detail")


def _refuse() -> None:
    raise RPCError(4000, "Refused", {"reason": "test"})


@pytest.fixture
def make_connection(registry: MethodRegistry, clock: MemoryReactorClock) -> Any:
    def make(**options: Any) -> Connection:
        return Connection(RPCServerFactory(registry, reactor=clock, **options))

    return make


@pytest.fixture
def connection(make_connection: Any) -> Connection:
    return make_connection()  # type: ignore[no-any-return]


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def logged(events: list[Any], level: LogLevel | None = None) -> list[str]:
    return [
        formatEvent(event)
        for event in events
        if event.get("log_namespace") == "netrpc.protocol"
        and (level is None or event["log_level"] is level)
    ]


@pytest.mark.parametrize(
    ("name", "sent", "expected"),
    spec_service.EXAMPLES,
    ids=[example[0] for example in spec_service.EXAMPLES],
)
def test_specification_example(connection: Connection, name: str, sent: str, expected: Any) -> None:
    connection.send(sent)
    replies = connection.replies()
    if expected is None:
        assert replies == []
    else:
        assert [spec_service.normalize(reply) for reply in replies] == [spec_service.normalize(expected)]


def test_notifications_run(connection: Connection) -> None:
    spec_service.notified.clear()
    connection.send({"jsonrpc": "2.0", "method": "update", "params": [1, 2]})
    assert spec_service.notified == [("update", (1, 2))]


@pytest.mark.parametrize(
    "notification",
    [
        {"jsonrpc": "2.0", "method": "fail"},
        {"jsonrpc": "2.0", "method": "refuse"},
        {"jsonrpc": "2.0", "method": "unencodable"},
        {"jsonrpc": "2.0", "method": "multiply", "params": [1]},
        {"jsonrpc": "2.0", "method": "nope"},
    ],
)
def test_notification_never_replied(connection: Connection, notification: Any) -> None:
    connection.send(notification)
    connection.send([notification, notification])
    assert connection.replies() == []


def test_notification_timeout_not_replied(make_connection: Any, clock: MemoryReactorClock) -> None:
    connection = make_connection(call_timeout=1)
    connection.send({"jsonrpc": "2.0", "method": "wait", "params": ["n"]})
    clock.advance(1)
    assert connection.replies() == []


def test_replies_in_finishing_order(connection: Connection, controlled: Controlled) -> None:
    connection.call("wait", ["first"], request_id=1)
    connection.call("wait", ["second"], request_id=2)
    controlled.fire("second")
    controlled.fire("first")
    assert connection.replies() == [
        {"jsonrpc": "2.0", "result": "second", "id": 2},
        {"jsonrpc": "2.0", "result": "first", "id": 1},
    ]


def test_batch_runs_concurrently(connection: Connection, controlled: Controlled) -> None:
    connection.send(
        [
            jsonrpc.build_request("wait", ["a"], "a"),
            jsonrpc.build_request("wait", ["b"], "b"),
            jsonrpc.build_request("multiply", [6, 7], "m"),
        ]
    )
    assert set(controlled.pending) == {"a", "b"}
    controlled.fire("b")
    assert connection.replies() == []
    controlled.fire("a")
    (batch,) = connection.replies()
    assert sorted(batch, key=lambda reply: reply["id"]) == [
        {"jsonrpc": "2.0", "result": "a", "id": "a"},
        {"jsonrpc": "2.0", "result": "b", "id": "b"},
        {"jsonrpc": "2.0", "result": 42, "id": "m"},
    ]


def test_batch_too_long(make_connection: Any) -> None:
    connection = make_connection(max_batch_length=2)
    connection.send([jsonrpc.build_request("echo", [i], i) for i in range(3)])
    (reply,) = connection.replies()
    assert reply["error"]["code"] == jsonrpc.OVERLOADED


def test_internal_error_hides_details(connection: Connection, logs: list[Any]) -> None:
    connection.call("fail", [], request_id=9)
    (reply,) = connection.replies()
    error_id = reply["error"]["data"]["error_id"]
    assert reply == {
        "jsonrpc": "2.0",
        "error": {"code": -32603, "message": "Internal error", "data": {"error_id": error_id}},
        "id": 9,
    }
    assert "secret" not in json.dumps(reply)

    (event,) = [event for event in logs if event.get("log_failure") is not None]
    assert event["error_id"] == error_id
    assert f"error id {error_id}" in formatEvent(event)
    assert "127.0.0.1:40000" in formatEvent(event)
    assert "secret internal detail" in event["log_failure"].getTraceback()


def test_rpc_error_sent(connection: Connection) -> None:
    connection.call("refuse", [], request_id="r")
    assert connection.replies() == [
        {"jsonrpc": "2.0", "error": {"code": 4000, "message": "Refused", "data": {"reason": "test"}}, "id": "r"}
    ]


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (lambda: defer.succeed("done"), {"result": "done"}),
        (lambda: defer.fail(RPCError(4001, "No")), {"error": {"code": 4001, "message": "No"}}),
    ],
    ids=["succeeded", "failed"],
)
def test_fired_deferred_replied(
    registry: MethodRegistry, connection: Connection, function: Any, expected: dict[str, Any]
) -> None:
    """A method whose Deferred has already fired gets its reply at once."""
    registry.add_function("fired", function)
    connection.call("fired", [], request_id=7)
    assert connection.replies() == [{"jsonrpc": "2.0", **expected, "id": 7}]


def test_paused_deferred_replied_later(registry: MethodRegistry, connection: Connection) -> None:
    """A fired Deferred that waits on another one replies once that one fires."""
    inner: Deferred[str] = Deferred()

    def method() -> Deferred[Any]:
        outer: Deferred[Any] = defer.succeed(None)
        outer.addCallback(lambda _: inner)
        return outer

    registry.add_function("paused", method)
    connection.call("paused", [], request_id=8)
    assert connection.replies() == []
    inner.callback("late")
    assert connection.replies() == [{"jsonrpc": "2.0", "result": "late", "id": 8}]


def test_unencodable_result(connection: Connection, logs: list[Any]) -> None:
    connection.call("unencodable", [], request_id=3)
    (reply,) = connection.replies()
    assert reply["error"]["code"] == jsonrpc.INTERNAL_ERROR
    assert reply["id"] == 3
    (message,) = logged(logs, LogLevel.error)
    assert "Reply to unencodable from 127.0.0.1:40000 cannot be encoded as JSON" in message
    assert reply["error"]["data"]["error_id"] in message


def test_unencodable_entry_in_batch(connection: Connection) -> None:
    """One entry that cannot be encoded spoils only its own reply."""
    connection.send([jsonrpc.build_request("unencodable", [], 1), jsonrpc.build_request("echo", ["ok"], 2)])
    (batch,) = connection.replies()
    by_id = {reply["id"]: reply for reply in batch}
    assert by_id[1]["error"]["code"] == jsonrpc.INTERNAL_ERROR
    assert by_id[2]["result"] == "ok"


def test_call_timeout(make_connection: Any, clock: MemoryReactorClock, controlled: Controlled) -> None:
    connection = make_connection(call_timeout=5)
    connection.call("wait", ["slow"], request_id="t")
    clock.advance(4.9)
    assert connection.replies() == []
    clock.advance(0.1)
    (reply,) = connection.replies()
    assert reply["error"]["code"] == jsonrpc.CALL_TIMEOUT
    assert reply["id"] == "t"
    assert controlled.cancelled == ["slow"]


def test_call_timeout_of_one_second(make_connection: Any, clock: MemoryReactorClock) -> None:
    connection = make_connection(call_timeout=1)
    connection.call("wait", ["slow"], request_id="t")
    clock.advance(1)
    (reply,) = connection.replies()
    assert "within 1 second" in reply["error"]["data"]
    assert "seconds" not in reply["error"]["data"]


def test_call_timeout_cancelled_on_finish(
    make_connection: Any, clock: MemoryReactorClock, controlled: Controlled
) -> None:
    connection = make_connection(call_timeout=5)
    connection.call("wait", ["quick"])
    assert len(clock.getDelayedCalls()) == 2
    controlled.fire("quick")
    # Only the idle timer is left.
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert len(connection.replies()) == 1


def test_in_flight_limit_pauses_reading(make_connection: Any, controlled: Controlled) -> None:
    connection = make_connection(max_in_flight=2)
    for key in "abcd":
        connection.call("wait", [key], request_id=key)
    assert set(controlled.pending) == {"a", "b"}
    assert not connection.reading

    controlled.fire("a")
    assert set(controlled.pending) == {"b", "c"}
    assert not connection.reading

    for key in "bcd":
        controlled.fire(key)
    assert connection.reading
    assert sorted(reply["id"] for reply in connection.replies()) == list("abcd")


def test_in_flight_limit_with_quick_calls(make_connection: Any) -> None:
    """Calls that finish at once never pause reading."""
    connection = make_connection(max_in_flight=1)
    stream = b"".join(
        encode(json.dumps(jsonrpc.build_request("echo", [i], i)).encode()) for i in range(50)
    )
    connection.protocol.dataReceived(stream)
    assert [reply["result"] for reply in connection.replies()] == list(range(50))
    assert connection.reading


def test_write_backpressure(connection: Connection, controlled: Controlled) -> None:
    """While the transport's send buffer is full, no new call starts."""
    connection.protocol.pauseProducing()
    connection.call("wait", ["queued"])
    assert controlled.pending == {}
    assert not connection.reading

    connection.protocol.resumeProducing()
    assert set(controlled.pending) == {"queued"}
    assert connection.reading


def test_unread_replies_disconnect(make_connection: Any, controlled: Controlled, logs: list[Any]) -> None:
    connection = make_connection(max_unsent_bytes=150)
    for key in "abc":
        connection.call("wait", [key], request_id=key)
    connection.protocol.pauseProducing()
    controlled.fire("a", "x" * 60)
    assert not connection.closed
    controlled.fire("b", "x" * 60)
    assert connection.closed
    assert "left more than 150 bytes of replies unread" in logged(logs, LogLevel.warn)[0]


@pytest.mark.parametrize(
    ("data", "reason", "replied"),
    [
        (b"x", "does not start with a digit", False),
        (b"007:abcdefg,", "leading zero", False),
        (b"2000000:", "above the maximum of 1048576 bytes", True),
        (b"3:abcd", "not followed by a comma", True),
    ],
)
def test_framing_error_closes(
    connection: Connection, logs: list[Any], data: bytes, reason: str, replied: bool
) -> None:
    connection.protocol.dataReceived(data)
    connection.protocol.dataReceived(b"more garbage")
    replies = connection.replies()
    if replied:
        assert [reply["error"]["code"] for reply in replies] == [jsonrpc.PARSE_ERROR]
        assert reason in replies[0]["error"]["data"]
    else:
        assert replies == []
    assert connection.closed
    (message,) = logged(logs)
    assert message.startswith("Closing connection from 127.0.0.1:40000: ")
    assert reason in message


def test_framing_error_answers_earlier_calls(connection: Connection, controlled: Controlled) -> None:
    """Calls that arrived before the bad frame still get their replies before the close."""
    good = encode(json.dumps(jsonrpc.build_request("wait", ["pending"], 1)).encode())
    quick = encode(json.dumps(jsonrpc.build_request("echo", ["quick"], 2)).encode())
    connection.protocol.dataReceived(good + quick + b"x")
    assert not connection.closed
    controlled.fire("pending")
    assert [reply["id"] for reply in connection.replies()] == [2, 1]
    assert connection.closed


def test_eof_inside_frame_logged(connection: Connection, logs: list[Any]) -> None:
    connection.protocol.dataReceived(b"10:abc")
    connection.transport.loseConnection()
    assert logged(logs) == ["Connection from 127.0.0.1:40000 closed in the middle of a frame"]


def test_connection_lost_cancels_calls(connection: Connection, controlled: Controlled, logs: list[Any]) -> None:
    connection.call("wait", ["call"])
    connection.send({"jsonrpc": "2.0", "method": "wait", "params": ["notification"]})
    connection.transport.loseConnection()
    assert controlled.cancelled == ["call"]
    controlled.fire("notification")
    assert logged(logs) == []


def test_idle_timeout(make_connection: Any, clock: MemoryReactorClock, controlled: Controlled) -> None:
    connection = make_connection(idle_timeout=30, call_timeout=0)
    clock.advance(20)
    connection.call("wait", ["long"])
    clock.advance(60)
    assert not connection.closed
    controlled.fire("long")
    clock.advance(29)
    assert not connection.closed
    clock.advance(1)
    assert connection.closed


def test_max_connections(registry: MethodRegistry, clock: MemoryReactorClock, logs: list[Any]) -> None:
    factory = RPCServerFactory(registry, reactor=clock, max_connections=1)
    first = Connection(factory)
    second = Connection(factory)
    third = Connection(factory)
    assert not first.closed
    assert second.closed and third.closed
    assert factory.rejected_connections == 2
    (message,) = logged(logs)
    assert "1 connection open (max_connections)" in message

    first.transport.loseConnection()
    assert not Connection(factory).closed


def test_caller_identity(registry: MethodRegistry, clock: MemoryReactorClock) -> None:
    identity = PeerIdentity("tester", serial=1)
    connection = Connection(RPCServerFactory(registry, reactor=clock, default_caller=identity))
    connection.call("whoami")
    assert connection.replies()[0]["result"]["common_name"] == "tester"


def test_ipv6_peer_address(registry: MethodRegistry, clock: MemoryReactorClock) -> None:
    connection = Connection(RPCServerFactory(registry, reactor=clock), IPv6Address("TCP", "::1", 7))
    assert connection.protocol.peer == "[::1]:7"


def test_drain_waits_for_calls(
    registry: MethodRegistry, clock: MemoryReactorClock, controlled: Controlled
) -> None:
    factory = RPCServerFactory(registry, reactor=clock)
    busy, idle = Connection(factory), Connection(factory)
    busy.call("wait", ["running"], request_id=1)
    drained = factory.drain(10)

    assert idle.closed
    assert not busy.closed
    busy.call("echo", ["late"], request_id=2)
    assert busy.replies() == [jsonrpc.error_reply(2, jsonrpc.SHUTTING_DOWN, data=jsonrpc.NOT_STARTED)]

    controlled.fire("running")
    assert busy.replies() == [jsonrpc.result_reply(1, "running")]
    assert busy.closed
    assert drained.called
    assert not clock.getDelayedCalls()


def test_drain_reads_new_requests(
    registry: MethodRegistry, clock: MemoryReactorClock, controlled: Controlled
) -> None:
    """A draining connection keeps reading, so requests that arrive get SHUTTING_DOWN errors."""
    factory = RPCServerFactory(registry, reactor=clock, max_in_flight=1)
    connection = Connection(factory)
    connection.call("wait", ["running"], request_id=1)
    assert not connection.reading

    factory.drain(10)
    assert connection.reading
    connection.call("echo", ["late"], request_id=2)
    assert connection.replies() == [jsonrpc.error_reply(2, jsonrpc.SHUTTING_DOWN, data=jsonrpc.NOT_STARTED)]

    connection.protocol.pauseProducing()
    assert not connection.reading
    connection.protocol.resumeProducing()
    assert connection.reading

    controlled.fire("running")
    assert connection.replies() == [jsonrpc.result_reply(1, "running")]
    assert connection.closed


def test_drain_stops_calls_after_grace(
    registry: MethodRegistry, clock: MemoryReactorClock, controlled: Controlled
) -> None:
    factory = RPCServerFactory(registry, reactor=clock, call_timeout=60)
    connection = Connection(factory)
    connection.send([jsonrpc.build_request("wait", ["stuck"], 1), jsonrpc.build_request("echo", [2], 2)])
    drained = factory.drain(10)
    clock.advance(9)
    assert connection.replies() == []
    clock.advance(1)
    (batch,) = connection.replies()
    stopped = sorted(batch, key=lambda reply: reply["id"])[0]["error"]
    assert stopped["code"] == jsonrpc.SHUTTING_DOWN
    # It was running, so its error must not claim that it did not start.
    assert stopped["data"] != jsonrpc.NOT_STARTED
    assert controlled.cancelled == ["stuck"]
    assert connection.closed
    assert drained.called
    assert not clock.getDelayedCalls()


def test_drain_answers_queued_requests(
    registry: MethodRegistry, clock: MemoryReactorClock, controlled: Controlled
) -> None:
    factory = RPCServerFactory(registry, reactor=clock, max_in_flight=1)
    connection = Connection(factory)
    connection.call("wait", ["first"], request_id=1)
    connection.call("echo", ["queued"], request_id=2)
    factory.drain(10)
    assert connection.replies() == [jsonrpc.error_reply(2, jsonrpc.SHUTTING_DOWN, data=jsonrpc.NOT_STARTED)]
    controlled.fire("first")
    assert connection.replies() == [jsonrpc.result_reply(1, "first")]


def test_drain_aborts_stuck_connections(registry: MethodRegistry, clock: MemoryReactorClock) -> None:
    """A connection whose close does not complete is aborted after the close timeout."""
    factory = RPCServerFactory(registry, reactor=clock)
    connection = Connection(factory)
    # A transport that never reports the close, like a peer that stops reading.
    connection.transport.loseConnection = lambda: None  # type: ignore[method-assign]
    drained = factory.drain(1)
    assert not drained.called
    connection.transport.abortConnection = lambda: connection.protocol.connectionLost()  # type: ignore[method-assign]
    clock.advance(1 + CLOSE_TIMEOUT)
    assert drained.called


def test_close_without_reply_aborted(connection: Connection, clock: MemoryReactorClock, logs: list[Any]) -> None:
    """A close the peer never completes with its own close-notify is aborted after the close timeout."""
    # A transport that never reports the close, like a peer that stops reading.
    connection.transport.loseConnection = lambda: None  # type: ignore[method-assign]
    aborted: list[bool] = []
    connection.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    connection.protocol.dataReceived(b"x")

    clock.advance(CLOSE_TIMEOUT - 0.1)
    assert aborted == []
    clock.advance(0.1)
    assert aborted == [True]
    assert "no TLS close-notify in reply within 5 s" in logged(logs)[-1]


def test_close_timer_cancelled(connection: Connection, clock: MemoryReactorClock) -> None:
    connection.protocol.dataReceived(b"x")
    assert connection.closed
    assert not [call for call in clock.getDelayedCalls() if call.active()]


def test_drain_rejects_new_connections(registry: MethodRegistry, clock: MemoryReactorClock) -> None:
    factory = RPCServerFactory(registry, reactor=clock)
    factory.drain(1)
    assert Connection(factory).closed


def test_txjsonrpc_lookup(connection: Connection) -> None:
    """txJSON-RPC's own lookup on the protocol resolves through the registry."""
    assert connection.protocol._getFunction("echo")("x") == "x"
    assert "echo" in connection.protocol._listFunctions()


@pytest.mark.parametrize("name", ["max_message_size", "max_batch_length", "max_in_flight", "max_connections"])
def test_invalid_limit(registry: MethodRegistry, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a whole number of at least 1, got 0"):
        RPCServerFactory(registry, **{name: 0})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.lists(st.binary(max_size=60), max_size=4))
def test_any_bytes(registry: MethodRegistry, chunks: list[bytes]) -> None:
    """Any bytes yield well-formed replies or a clean close, never an exception."""
    connection = Connection(RPCServerFactory(registry, reactor=MemoryReactorClock(), max_message_size=40))
    for chunk in chunks:
        connection.protocol.dataReceived(chunk)
    for reply in connection.replies():
        for item in reply if isinstance(reply, list) else [reply]:
            assert item["jsonrpc"] == "2.0"
            assert "id" in item
            assert ("result" in item) != ("error" in item)


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[list[bytes], list[int], bool]:
    """
    Frames of calls with ids 0, 1, ... mixed with frames of random bytes,
    maybe followed by bytes that break the framing, cut into chunks. Returns
    the chunks, the ids of the calls and whether the framing breaks.
    """
    payloads, ids = [], []
    for index in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            method = draw(st.sampled_from(["echo", "multiply", "nope", "fail"]))
            params = draw(st.lists(st.integers(-5, 5), max_size=2))
            payloads.append(json.dumps(jsonrpc.build_request(method, params, index)).encode())
            ids.append(index)
        else:
            payloads.append(draw(st.binary(max_size=30)))
    stream = b"".join(encode(payload) for payload in payloads)
    broken = draw(st.sampled_from([b"", b"x", b"01:", b"5:abcdef", b"99999:"]))
    stream += broken
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
    return chunks, ids, bool(broken)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(request_streams())
def test_any_stream(registry: MethodRegistry, stream: tuple[list[bytes], list[int], bool]) -> None:
    """Each call in a stream gets one reply with its id, and only broken framing closes the connection."""
    chunks, ids, broken = stream
    connection = Connection(RPCServerFactory(registry, reactor=MemoryReactorClock(), max_message_size=200))
    for chunk in chunks:
        connection.protocol.dataReceived(chunk)
        assert connection.protocol._decoder.buffered <= 200 + len(b",")

    replies = connection.replies()
    assert sorted(reply["id"] for reply in replies if reply["id"] is not None) == ids
    for reply in replies:
        assert reply["jsonrpc"] == "2.0"
        assert ("result" in reply) != ("error" in reply)
    assert connection.closed == broken


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=100)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"jsonrpc": st.just("2.0"), "method": st.sampled_from(["echo", "multiply", "nope", "fail"])},
            optional={
                "params": st.lists(st.integers(-5, 5), max_size=3),
                "id": st.integers(0, 1000) | st.text(max_size=3),
            },
        ),
        min_size=1,
        max_size=5,
    )
)
def test_one_reply_per_call(registry: MethodRegistry, batch: list[dict[str, Any]]) -> None:
    """Every call gets exactly one reply with its id; notifications get none."""
    connection = Connection(RPCServerFactory(registry, reactor=MemoryReactorClock()))
    connection.send(batch)
    replies = connection.replies()
    expected_ids = sorted(json.dumps(entry["id"]) for entry in batch if "id" in entry)
    if not expected_ids:
        assert replies == []
        return
    (array,) = replies
    assert sorted(json.dumps(reply["id"]) for reply in array) == expected_ids


def test_failures_consumed() -> None:
    """Deferreds of failed calls are handled, so none is left unhandled."""
    registry = MethodRegistry()
    registry.add_function("fail", _fail)
    connection = Connection(RPCServerFactory(registry, reactor=MemoryReactorClock()))
    with capturedLogs() as events:
        connection.call("fail")
        gc.collect()
    assert not [event for event in events if "Unhandled error in Deferred" in formatEvent(event)]
