"""
The examples of section 7 of the JSON-RPC 2.0 specification
(https://www.jsonrpc.org/specification#examples) and a service module with
the methods they call, shared by the envelope, protocol and TLS tests.

Load the service with ``load_service("spec_service")``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["get_data", "notify_hello", "notify_sum", "subtract", "sum", "update"]

# Every call of a notification method lands here, so tests can check that
# notifications ran although nothing was sent back.
notified: list[tuple[str, tuple[Any, ...]]] = []


def subtract(minuend: float, subtrahend: float) -> float:
    return minuend - subtrahend


def sum(*numbers: float) -> float:  # noqa: A001 - the specification's name
    total = 0.0
    for number in numbers:
        total += number
    return int(total) if total.is_integer() else total


def update(*values: Any) -> None:
    notified.append(("update", values))


def get_data() -> list[Any]:
    return ["hello", 5]


def notify_hello(*values: Any) -> None:
    notified.append(("notify_hello", values))


def notify_sum(*values: Any) -> None:
    notified.append(("notify_sum", values))


# (name, request as sent, expected reply or None for no reply at all).
EXAMPLES: list[tuple[str, str, Any]] = [
    (
        "positional params",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        {"jsonrpc": "2.0", "result": 19, "id": 1},
    ),
    (
        "positional params reversed",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        {"jsonrpc": "2.0", "result": -19, "id": 2},
    ),
    (
        "named params",
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
        {"jsonrpc": "2.0", "result": 19, "id": 3},
    ),
    (
        "named params reordered",
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}',
        {"jsonrpc": "2.0", "result": 19, "id": 4},
    ),
    (
        "notification with params",
        '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
        None,
    ),
    (
        "notification of unknown method",
        '{"jsonrpc": "2.0", "method": "foobar"}',
        None,
    ),
    (
        "unknown method",
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"},
    ),
    (
        "invalid JSON",
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
    ),
    (
        "invalid request object",
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
    ),
    (
        "batch with invalid JSON",
        """[
          {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
          {"jsonrpc": "2.0", "method"
        ]""",
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
    ),
    (
        "empty array",
        "[]",
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
    ),
    (
        "invalid batch of one",
        "[1]",
        [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}],
    ),
    (
        "invalid batch",
        "[1,2,3]",
        [
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        ],
    ),
    (
        "batch",
        """[
          {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
          {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
          {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
          {"foo": "boo"},
          {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
          {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
        ]""",
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
            {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ],
    ),
    (
        "batch of notifications",
        """[
          {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
          {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
        ]""",
        None,
    ),
]


def normalize(reply: Any) -> Any:
    """
    Drop the optional ``data`` of error objects and sort batch replies, whose
    order the specification leaves open, so replies compare with EXAMPLES.
    """
    if isinstance(reply, list):
        return sorted((normalize(item) for item in reply), key=json.dumps)
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        error = {key: value for key, value in reply["error"].items() if key != "data"}
        return {**reply, "error": error}
    return reply
