"""Tests for netrpc.jsonrpc: the JSON-RPC 2.0 envelope without I/O."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
import spec_service
from hypothesis import given
from hypothesis import strategies as st

from netrpc import jsonrpc
from netrpc.exceptions import RemoteError, RemoteProtocolError
from netrpc.jsonrpc import (
    MAX_INTEGER_DIGITS,
    MAX_NESTING_DEPTH,
    EncodingError,
    Message,
    Request,
    build_notification,
    build_request,
    encode_batch,
    encode_message,
    error_reply,
    parse_message,
    parse_response,
    result_reply,
)

SPEC_METHODS = {name: getattr(spec_service, name) for name in spec_service.__all__}


def answer(data: bytes) -> Any:
    """Run a message against the specification's methods, as a server would, without I/O."""
    message = parse_message(data, max_batch_length=10)
    replies = []
    for entry in message.entries:
        if not isinstance(entry, Request):
            replies.append(encode_message(entry))
            continue
        function = SPEC_METHODS.get(entry.method)
        if function is None:
            reply = error_reply(entry.id, jsonrpc.METHOD_NOT_FOUND)
        elif isinstance(entry.params, dict):
            reply = result_reply(entry.id, function(**entry.params))
        else:
            reply = result_reply(entry.id, function(*entry.params))
        if not entry.is_notification:
            replies.append(encode_message(reply))
    if not replies:
        return None
    return json.loads(encode_batch(replies) if message.is_batch else replies[0])


def only_error(data: bytes, **options: Any) -> dict[str, Any]:
    """Parse a message that must yield exactly one error reply and return it."""
    message = parse_message(data, **options)
    assert not message.is_batch
    assert len(message.entries) == 1
    reply = message.entries[0]
    assert isinstance(reply, dict)
    return reply


def request_text(**members: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": "m", **members}).encode()


@pytest.mark.parametrize(
    ("name", "sent", "expected"),
    spec_service.EXAMPLES,
    ids=[example[0] for example in spec_service.EXAMPLES],
)
def test_specification_example(name: str, sent: str, expected: Any) -> None:
    assert spec_service.normalize(answer(sent.encode())) == spec_service.normalize(expected)


def test_request_fields() -> None:
    message = parse_message(request_text(params={"a": 1}, id="x"))
    assert message == Message(
        [Request(method="m", params={"a": 1}, id="x", is_notification=False)], is_batch=False
    )


def test_request_without_params() -> None:
    (entry,) = parse_message(request_text(id=1)).entries
    assert entry == Request(method="m", params=[], id=1, is_notification=False)


def test_notification_has_no_id() -> None:
    (entry,) = parse_message(request_text()).entries
    assert isinstance(entry, Request)
    assert entry.is_notification


def test_null_id_is_a_call() -> None:
    """An id of null is a request that gets a reply, unlike a missing id."""
    (entry,) = parse_message(request_text(id=None)).entries
    assert isinstance(entry, Request)
    assert not entry.is_notification
    assert entry.id is None


@pytest.mark.parametrize("request_id", ["abc", "", 0, -7, 2**62, 1.5, 1e-3])
def test_valid_id_kept_exactly(request_id: Any) -> None:
    (entry,) = parse_message(request_text(id=request_id)).entries
    assert isinstance(entry, Request)
    reply = json.loads(encode_message(result_reply(entry.id, None)))
    assert reply["id"] == request_id
    assert type(reply["id"]) is type(request_id)


@pytest.mark.parametrize(
    ("request_id", "reason"),
    [(True, "boolean true"), (False, "boolean false"), ({}, "an object"), ([1], "an array")],
)
def test_invalid_id(request_id: Any, reason: str) -> None:
    reply = only_error(request_text(id=request_id))
    assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert reason in reply["error"]["data"]
    assert reply["id"] is None


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"jsonrpc": None}, '"jsonrpc" is null'),
        ({"jsonrpc": "1.0"}, '"jsonrpc" is the string "1.0"'),
        ({"jsonrpc": 2.0}, '"jsonrpc" is the number 2.0'),
        ({"method": None}, '"method" is null'),
        ({"method": ["m"]}, '"method" is an array'),
        ({"params": "bar"}, '"params" is the string "bar"'),
        ({"params": 5}, '"params" is the number 5'),
        ({"params": None}, '"params" is null'),
        ({"params": True}, '"params" is the boolean true'),
    ],
)
def test_invalid_member(members: dict[str, Any], reason: str) -> None:
    """An invalid request with a valid id gets its error under that id."""
    reply = only_error(request_text(id=7, **members))
    assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert reason in reply["error"]["data"]
    assert reply["id"] == 7


def test_missing_jsonrpc() -> None:
    reply = only_error(b'{"method": "m", "id": 1}')
    assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert 'expected "jsonrpc": "2.0"' in reply["error"]["data"]


def test_missing_method() -> None:
    reply = only_error(b'{"jsonrpc": "2.0", "id": 1}')
    assert reply["error"]["data"] == 'member "method" is missing'


def test_invalid_notification_gets_reply() -> None:
    """Without a valid request object there is no notification, so an error goes back."""
    reply = only_error(b'{"jsonrpc": "2.0", "method": "m", "params": 1}')
    assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert reply["id"] is None


@pytest.mark.parametrize("text", [b"5", b'"m"', b"null", b"true"])
def test_scalar_message(text: bytes) -> None:
    reply = only_error(text)
    assert reply["error"]["code"] == jsonrpc.INVALID_REQUEST


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"jsonrpc": "2.0", "method": "\xff", "id": 1}', "invalid UTF-8 at byte 30"),
        (b'\xef\xbb\xbf{"jsonrpc": "2.0", "method": "m"}', "invalid JSON"),
        ('{"jsonrpc": "2.0", "method": "m"}'.encode("utf-16"), "invalid UTF-8"),
        (b"", "invalid JSON"),
        (b'{"jsonrpc": "2.0", "method": "m"} {}', "invalid JSON"),
    ],
)
def test_parse_error(data: bytes, reason: str) -> None:
    reply = only_error(data)
    assert reply["error"] == {
        "code": jsonrpc.PARSE_ERROR,
        "message": "Parse error",
        "data": reply["error"]["data"],
    }
    assert reason in reply["error"]["data"]
    assert reply["id"] is None


def test_nesting_at_maximum() -> None:
    nested = "[" * (MAX_NESTING_DEPTH - 1) + "]" * (MAX_NESTING_DEPTH - 1)
    (entry,) = parse_message(request_text(id=1).replace(b'"m"', b'"m", "params": ' + nested.encode())).entries
    assert isinstance(entry, Request)


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH + 1, 500, 100_000])
def test_nesting_too_deep(depth: int) -> None:
    reply = only_error(b"[" * depth + b"]" * depth)
    assert reply["error"]["code"] == jsonrpc.PARSE_ERROR
    assert "deeper than the maximum of 64" in reply["error"]["data"]


def test_nesting_too_deep_in_objects() -> None:
    text = '{"a":' * (MAX_NESTING_DEPTH + 1) + "1" + "}" * (MAX_NESTING_DEPTH + 1)
    reply = only_error(text.encode())
    assert reply["error"]["code"] == jsonrpc.PARSE_ERROR


def test_many_shallow_brackets() -> None:
    """A wide batch has many brackets but is not deep."""
    batch = json.dumps([{"jsonrpc": "2.0", "method": "m", "params": [[1]], "id": i} for i in range(50)])
    message = parse_message(batch.encode())
    assert all(isinstance(entry, Request) for entry in message.entries)


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("1" * (MAX_INTEGER_DIGITS + 1), "above the maximum of 100 digits"),
        ("-" + "9" * 5000, "above the maximum of 100 digits"),
        ("1e400", "outside the range"),
        ("-1E+400", "outside the range"),
        ("1" * 400 + ".5", "outside the range"),
        ("NaN", "NaN is not valid JSON"),
        ("Infinity", "Infinity is not valid JSON"),
        ("-Infinity", "-Infinity is not valid JSON"),
    ],
)
def test_number_rejected(number: str, reason: str) -> None:
    reply = only_error(request_text(id=1).replace(b'"id": 1', b'"id": ' + number.encode()))
    assert reply["error"]["code"] == jsonrpc.PARSE_ERROR
    assert reason in reply["error"]["data"]


@pytest.mark.parametrize(
    ("number", "value"),
    [
        ("9" * MAX_INTEGER_DIGITS, int("9" * MAX_INTEGER_DIGITS)),
        ("18446744073709551617", 2**64 + 1),
        ("-9223372036854775809", -(2**63) - 1),
        ("1e300", 1e300),
        ("2.5E-3", 0.0025),
    ],
)
def test_number_accepted(number: str, value: Any) -> None:
    text = request_text(id=1).replace(b'"m"', b'"m", "params": [' + number.encode() + b"]")
    (entry,) = parse_message(text).entries
    assert isinstance(entry, Request)
    assert entry.params == [value]


def test_lone_surrogate_escape_accepted() -> None:
    """orjson refuses it; the json path takes it, so a reply can echo it."""
    (entry,) = parse_message(b'{"jsonrpc": "2.0", "method": "m", "params": ["\\ud800"]}').entries
    assert isinstance(entry, Request)
    assert entry.params == ["\ud800"]


def test_digits_in_string_accepted() -> None:
    """A long digit run inside a string is text, not a number."""
    (entry,) = parse_message(request_text(id="1" * 500 + "e5")).entries
    assert isinstance(entry, Request)


def test_batch_at_maximum() -> None:
    batch = json.dumps([{"jsonrpc": "2.0", "method": "m", "id": i} for i in range(3)])
    message = parse_message(batch.encode(), max_batch_length=3)
    assert message.is_batch
    assert len(message.entries) == 3


def test_batch_too_long() -> None:
    batch = json.dumps([{"jsonrpc": "2.0", "method": "m", "id": i} for i in range(4)])
    reply = only_error(batch.encode(), max_batch_length=3)
    assert reply["error"]["code"] == jsonrpc.OVERLOADED
    assert "batch of 4 requests is above the maximum of 3" in reply["error"]["data"]


def test_error_reply_without_data() -> None:
    assert error_reply(3, jsonrpc.INVALID_PARAMS) == {
        "jsonrpc": "2.0",
        "error": {"code": -32602, "message": "Invalid params"},
        "id": 3,
    }


def test_error_reply_with_data() -> None:
    reply = error_reply("a", 42, "Custom", data=None)
    assert reply["error"] == {"code": 42, "message": "Custom", "data": None}


def test_error_codes() -> None:
    assert (jsonrpc.CALL_TIMEOUT, jsonrpc.SHUTTING_DOWN, jsonrpc.FORBIDDEN, jsonrpc.OVERLOADED) == (
        -32001,
        -32002,
        -32003,
        -32004,
    )


def test_encode_is_compact_ascii() -> None:
    encoded = encode_message(result_reply(1, {"text": "é\ud800"}))
    assert encoded == b'{"jsonrpc":"2.0","result":{"text":"\\u00e9\\ud800"},"id":1}'


@pytest.mark.parametrize("result", ["é", {"n": 2**64}, {1: "x"}], ids=repr)
def test_encode_same_as_json(result: Any) -> None:
    """Where orjson would write otherwise, the output is json's."""
    expected = json.dumps(result_reply(1, result), separators=(",", ":")).encode()
    assert encode_message(result_reply(1, result)) == expected


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (float("nan"), "not JSON compliant"),
        (float("inf"), "not JSON compliant"),
        (object(), "not JSON serializable"),
        ({1j: 1}, "keys must be str"),
        (10**5000, "Exceeds the limit"),
        (datetime.datetime(2025, 1, 1), "not JSON serializable"),
        (Request("m", [], 1, False), "not JSON serializable"),
    ],
    ids=["nan", "infinity", "object", "complex key", "long integer", "datetime", "dataclass"],
)
def test_encode_rejects(result: Any, reason: str) -> None:
    with pytest.raises(EncodingError, match=reason):
        encode_message(result_reply(1, result))


def test_encode_rejects_circular() -> None:
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(EncodingError, match="Circular reference"):
        encode_message(result_reply(1, circular))


def test_encode_rejects_deep_result() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodingError, match="nested too deeply"):
        encode_message(result_reply(1, deep))


def test_encode_batch() -> None:
    parts = [encode_message(result_reply(i, i)) for i in range(2)]
    assert json.loads(encode_batch(parts)) == [result_reply(0, 0), result_reply(1, 1)]


def test_build_request() -> None:
    assert build_request("m", [1], 5) == {"jsonrpc": "2.0", "method": "m", "params": [1], "id": 5}
    assert build_request("m", None, "x") == {"jsonrpc": "2.0", "method": "m", "id": "x"}


def test_build_notification() -> None:
    notification = build_notification("m", {"a": 1})
    assert notification == {"jsonrpc": "2.0", "method": "m", "params": {"a": 1}}
    (entry,) = parse_message(encode_message(notification)).entries
    assert isinstance(entry, Request)
    assert entry.is_notification


def test_parse_response_result() -> None:
    (response,) = parse_response(b'{"jsonrpc":"2.0","result":[1],"id":"a"}')
    assert (response.id, response.result, response.error) == ("a", [1], None)


def test_parse_response_error() -> None:
    (response,) = parse_response(
        b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found","data":"x"},"id":1}'
    )
    assert isinstance(response.error, RemoteError)
    assert (response.error.code, response.error.message, response.error.data) == (
        -32601,
        "Method not found",
        "x",
    )


def test_parse_response_batch() -> None:
    responses = parse_response(b'[{"jsonrpc":"2.0","result":1,"id":1},{"jsonrpc":"2.0","result":2,"id":2}]')
    assert [response.result for response in responses] == [1, 2]


@pytest.mark.parametrize(
    "data",
    [
        b"nonsense",
        b"[]",
        b"5",
        b'{"result":1,"id":1}',
        b'{"jsonrpc":"2.0","result":1}',
        b'{"jsonrpc":"2.0","result":1,"id":true}',
        b'{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":"x"},"id":1}',
        b'{"jsonrpc":"2.0","id":1}',
        b'{"jsonrpc":"2.0","error":{"code":"1","message":"x"},"id":1}',
        b'{"jsonrpc":"2.0","error":"bad","id":1}',
    ],
)
def test_parse_response_rejects(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid reply from server"):
        parse_response(data)


def check_well_formed(message: Message) -> None:
    """Check that every entry is a runnable request or an encodable error reply."""
    assert message.entries
    for entry in message.entries:
        if isinstance(entry, Request):
            assert isinstance(entry.method, str)
            assert type(entry.params) in (list, dict)
            continue
        reply = json.loads(encode_message(entry))
        assert reply["jsonrpc"] == "2.0"
        assert type(reply["error"]["code"]) is int
        assert isinstance(reply["error"]["message"], str)


@given(st.binary(max_size=300))
def test_any_bytes_parse_cleanly(data: bytes) -> None:
    """Any byte string yields requests or well-formed error replies, never an exception."""
    check_well_formed(parse_message(data, max_batch_length=5))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["jsonrpc", "method", "params", "id", "x"]), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_any_json_parses_cleanly(value: Any) -> None:
    """Any JSON value, often close to a request object, yields a clean message."""
    check_well_formed(parse_message(json.dumps(value).encode(), max_batch_length=5))


@given(
    st.sampled_from(["m", "a.b"]),
    st.one_of(st.none(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=3)),
    st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.none()),
)
def test_request_roundtrip(method: str, params: Any, request_id: Any) -> None:
    """A request built by the client side parses back into the same request."""
    (entry,) = parse_message(encode_message(build_request(method, params, request_id))).entries
    assert entry == Request(method, [] if params is None else params, request_id, False)
