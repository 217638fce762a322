"""
The JSON-RPC 2.0 envelope without I/O: error codes, request parsing and
validation, reply building and encoding, and the matching client side.

Everything here takes and returns plain data, so the server protocol, the
async client and the blocking client share one reading of the
specification (https://www.jsonrpc.org/specification). Parsing never
raises: every input becomes either requests to run or ready error replies.

Choices where the specification leaves room:

- A request id may be a string, a number (fractional numbers too, although
  the specification states that they SHOULD NOT be used) or null. Booleans, arrays
  and objects are invalid ids.
- An invalid request object still gets a reply. Its id is the request's id
  when that id was present and valid, and null otherwise.
- Limits of this implementation (RFC 8259 section 9 allows them) are parse
  errors (-32700): nesting deeper than ``MAX_NESTING_DEPTH``, integers with
  more than ``MAX_INTEGER_DIGITS`` digits, floats outside the range of an
  IEEE 754 double, and the non-standard NaN and Infinity literals.
- A batch longer than the server's maximum gets one ``OVERLOADED`` error
  object in place of the batch reply.
- Replies are compact ASCII JSON: stdlib ``json`` with ``ensure_ascii``, so
  any string a request carried, even a lone surrogate escape, can be sent
  back. NaN and Infinity are never emitted.

Both directions try orjson first, because it is several times faster than
``json`` (docs/benchmarks.md has the measurement). They fall back to
``json`` wherever orjson would differ. orjson reads integers beyond 64 bits
as floats and rejects lone surrogate escapes. It writes NaN and Infinity as
null, and non-ASCII text as UTF-8. So the results, errors and limits above
hold whichever codec ran, and only the spelling of some floats differs
(``0.00001`` for ``1e-05``). orjson also encodes ``uuid.UUID`` and
``enum.Enum`` values, which ``json`` rejects.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Union

import orjson

from netrpc._plural import plural
from netrpc.exceptions import RemoteError, RemoteProtocolError

__all__ = [
    "CALL_TIMEOUT",
    "FORBIDDEN",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_INTEGER_DIGITS",
    "MAX_NESTING_DEPTH",
    "METHOD_NOT_FOUND",
    "NOT_STARTED",
    "OVERLOADED",
    "PARSE_ERROR",
    "SHUTTING_DOWN",
    "Message",
    "Reply",
    "Request",
    "RequestId",
    "Response",
    "EncodingError",
    "build_notification",
    "build_request",
    "encode_batch",
    "encode_message",
    "error_reply",
    "parse_message",
    "parse_response",
    "result_reply",
]

VERSION = "2.0"

# Codes defined by JSON-RPC 2.0, section 5.1.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# netrpc's codes, from the range the specification leaves to servers.
CALL_TIMEOUT = -32001
SHUTTING_DOWN = -32002
FORBIDDEN = -32003
OVERLOADED = -32004

# The data of a SHUTTING_DOWN error whose request the server rejected
# without starting it, because the request arrived during the drain. The
# call did not run, so a client may send it to another server, whatever
# the method does. A SHUTTING_DOWN error without this data comes from a
# call that was stopped at the end of the drain and may have run in part.
NOT_STARTED = "not started"

STANDARD_MESSAGES = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    CALL_TIMEOUT: "Call timed out",
    SHUTTING_DOWN: "Server shutting down",
    FORBIDDEN: "Forbidden",
    OVERLOADED: "Server overloaded",
}

# Deep enough for any real payload, shallow enough that no recursive code
# that walks the data (ours, a method's, json's encoder) comes near
# Python's recursion limit.
MAX_NESTING_DEPTH = 64

# 2**256 has 78 digits, so every fixed-width integer type fits. Longer
# numbers are rejected because converting them costs time quadratic in
# their length.
MAX_INTEGER_DIGITS = 100

RequestId = Union[str, int, float, None]
Reply = dict[str, Any]

_ID_TYPES = (str, int, float)
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Request:
    """
    A valid request object. ``is_notification`` is true when the request
    had no ``id`` member, and then nothing may be sent back for it.
    """

    method: str
    params: list[Any] | dict[str, Any]
    id: RequestId
    is_notification: bool


@dataclass(frozen=True, slots=True)
class Message:
    """
    One received message: its entries in order, each a ``Request`` to run
    or a ready error ``Reply``. ``is_batch`` is true when the replies go
    back as an array.
    """

    entries: list[Request | Reply]
    is_batch: bool


class EncodingError(ValueError):
    """A message contains a value that cannot be encoded as JSON."""


# --- Parsing received requests -------------------------------------------


class _LimitExceeded(ValueError):
    """The JSON text is valid but exceeds a limit of this implementation."""


def _reject_constant(name: str) -> Any:
    raise _LimitExceeded(f"{name} is not valid JSON")


def _parse_checked_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _LimitExceeded(
            f"integer with {len(text.lstrip('-'))} digits is above the maximum "
            f"of {MAX_INTEGER_DIGITS} digits"
        )
    return int(text)


def _parse_checked_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _LimitExceeded(
            f"number {text[:40]} is outside the range of a double-precision float"
        )
    return value


# Most messages have no long digit run and no exponent, and are decoded
# with json's C fast paths for numbers. The rest go through the checking
# hooks. A match inside a string only costs the slower path, never a wrong
# result.
_NEEDS_NUMBER_CHECKS = re.compile(r"\d{%d}|\d[eE][-+]?\d" % (MAX_INTEGER_DIGITS + 1))
_FAST_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_CHECKING_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_int=_parse_checked_int,
    parse_float=_parse_checked_float,
)


# orjson turns integers beyond 64 bits into floats; text with a digit run
# that long may hold one, so it takes the json path.
_LONG_DIGIT_RUN = re.compile(rb"\d{19}")


def _decode_json(data: bytes) -> Any:
    """
    Decode UTF-8 JSON text within this module's limits.

    Raises ``ValueError`` with a reason for invalid UTF-8, invalid JSON or
    an exceeded limit.
    """
    if not _LONG_DIGIT_RUN.search(data):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            # The json path below gives the reason, or accepts what orjson
            # rejects (lone surrogate escapes).
            pass
        else:
            if data.count(b"[") + data.count(b"{") > MAX_NESTING_DEPTH:
                _check_depth(value)
            return value
    return _decode_json_slowly(data)


def _decode_json_slowly(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"invalid UTF-8 at byte {error.start}") from None

    decoder = _CHECKING_DECODER if _NEEDS_NUMBER_CHECKS.search(text) else _FAST_DECODER
    try:
        value = decoder.decode(text)
    except RecursionError:
        raise ValueError(_too_deep()) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error}") from None

    # Only text with more opening brackets than the maximum depth can be
    # too deep, so most messages skip the walk.
    if text.count("[") + text.count("{") > MAX_NESTING_DEPTH:
        _check_depth(value)
    return value


def _too_deep() -> str:
    return f"nesting is deeper than the maximum of {MAX_NESTING_DEPTH} levels"


def _check_depth(value: Any) -> None:
    """Raise ``ValueError`` when arrays and objects nest too deeply."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_NESTING_DEPTH:
            raise ValueError(_too_deep())
        pending.extend((child, depth + 1) for child in children)


def parse_message(data: bytes, *, max_batch_length: int | None = None) -> Message:
    """
    Parse one received message into requests to run and ready error replies.

    Raises no exception for any input (the property tests in
    tests/test_jsonrpc.py check this). A batch longer than
    ``max_batch_length`` becomes a single ``OVERLOADED`` error.
    """
    try:
        value = _decode_json(data)
    except ValueError as error:
        return _single_error(PARSE_ERROR, str(error))

    if isinstance(value, dict):
        return Message([_parse_entry(value)], is_batch=False)
    if not isinstance(value, list):
        return _single_error(
            INVALID_REQUEST,
            f"message is {_describe(value)}, expected a request object or an array",
        )
    if not value:
        return _single_error(INVALID_REQUEST, "batch is an empty array")
    if max_batch_length is not None and len(value) > max_batch_length:
        return _single_error(
            OVERLOADED,
            f"batch of {plural(len(value), 'request')} is above the maximum of "
            f"{max_batch_length}; split it into smaller batches",
        )
    return Message([_parse_entry(entry) for entry in value], is_batch=True)


def _single_error(code: int, reason: str) -> Message:
    return Message([error_reply(None, code, data=reason)], is_batch=False)


def _parse_entry(entry: Any) -> Request | Reply:
    """Validate one request object, returning a ``Request`` or an error reply."""
    if not isinstance(entry, dict):
        return error_reply(
            None,
            INVALID_REQUEST,
            data=f"request is {_describe(entry)}, expected an object",
        )

    has_id = "id" in entry
    request_id = entry.get("id")
    if request_id is not None and type(request_id) not in _ID_TYPES:
        return error_reply(
            None,
            INVALID_REQUEST,
            data=f"id is {_describe(request_id)}, expected a string, number or null",
        )

    problem = _find_request_problem(entry)
    if problem is not None:
        return error_reply(request_id, INVALID_REQUEST, data=problem)

    params = entry.get("params", _MISSING)
    return Request(
        method=entry["method"],
        params=[] if params is _MISSING else params,
        id=request_id,
        is_notification=not has_id,
    )


def _find_request_problem(entry: dict[str, Any]) -> str | None:
    """Describe what makes ``entry`` an invalid request object, or return None."""
    version = entry.get("jsonrpc", _MISSING)
    if version is _MISSING:
        return 'member "jsonrpc" is missing, expected "jsonrpc": "2.0"'
    if version != VERSION:
        return f'"jsonrpc" is {_describe(version)}, expected "2.0"'

    method = entry.get("method", _MISSING)
    if method is _MISSING:
        return 'member "method" is missing'
    if type(method) is not str:
        return f'"method" is {_describe(method)}, expected a string'

    params = entry.get("params", _MISSING)
    if params is not _MISSING and type(params) not in (list, dict):
        return f'"params" is {_describe(params)}, expected an array or an object'
    return None


def _describe(value: Any) -> str:
    """Name a JSON value's type, with the value itself when it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"the number {str(value)[:40]}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, list):
        return f"an array of {plural(len(value), 'item')}"
    return "an object"


# --- Building and encoding replies ---------------------------------------


def result_reply(request_id: RequestId, result: Any) -> Reply:
    """Build the reply object for a successful call."""
    return {"jsonrpc": VERSION, "result": result, "id": request_id}


def error_reply(
    request_id: RequestId,
    code: int,
    message: str | None = None,
    data: Any = _MISSING,
) -> Reply:
    """
    Build an error reply object. ``message`` defaults to the standard text
    for ``code``; ``data`` is left out unless given.
    """
    if message is None:
        message = STANDARD_MESSAGES.get(code, "Server error")
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not _MISSING:
        error["data"] = data
    return {"jsonrpc": VERSION, "error": error, "id": request_id}


_ENCODER = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, separators=(",", ":")
)

# Types orjson would encode and json refuses go to json, which names them.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _reject_type(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def encode_message(message: Reply | list[Reply]) -> bytes:
    """
    Encode a request, a reply or a batch of them as JSON text.

    Raises ``EncodingError`` naming the problem when the message holds a
    value JSON cannot represent: an unsupported type, NaN or Infinity, a
    circular reference, nesting too deep, or an integer too long to print.
    """
    try:
        encoded = orjson.dumps(message, default=_reject_type, option=_ORJSON_OPTIONS)
    except TypeError:
        encoded = b""
    # orjson writes NaN and Infinity as null, so output with a null in it
    # is encoded again by json, which rejects them. Non-ASCII output is
    # encoded again too, because replies are ASCII.
    if encoded and encoded.isascii() and b"null" not in encoded:
        return encoded
    try:
        return _ENCODER.encode(message).encode("ascii")
    except RecursionError:
        raise EncodingError("value is nested too deeply to encode") from None
    except (TypeError, ValueError) as error:
        raise EncodingError(str(error)) from None


def encode_batch(encoded_replies: list[bytes]) -> bytes:
    """Join replies already encoded with ``encode_message`` into a batch reply."""
    return b"[" + b",".join(encoded_replies) + b"]"


# --- The client side -----------------------------------------------------


def build_request(
    method: str, params: list[Any] | dict[str, Any] | None, request_id: RequestId
) -> dict[str, Any]:
    """Build a request object; ``params`` of None leaves the member out."""
    request: dict[str, Any] = {"jsonrpc": VERSION, "method": method}
    if params is not None:
        request["params"] = params
    request["id"] = request_id
    return request


def build_notification(
    method: str, params: list[Any] | dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build a notification: a request object without an id."""
    notification: dict[str, Any] = {"jsonrpc": VERSION, "method": method}
    if params is not None:
        notification["params"] = params
    return notification


@dataclass(frozen=True, slots=True)
class Response:
    """
    One reply as a client reads it: ``error`` is None and ``result`` is
    the result, or ``error`` is the server's error.
    """

    id: RequestId
    result: Any
    error: RemoteError | None


def parse_response(data: bytes) -> list[Response]:
    """
    Parse a reply message, single or batch, into its responses.

    Raises ``RemoteProtocolError`` when the message is not valid JSON or a
    reply object breaks JSON-RPC 2.0.
    """
    try:
        value = _decode_json(data)
    except ValueError as error:
        raise RemoteProtocolError(f"invalid reply from server: {error}") from None

    if isinstance(value, list):
        if not value:
            raise RemoteProtocolError("invalid reply from server: empty array")
        return [_parse_response_object(item) for item in value]
    return [_parse_response_object(value)]


def _parse_response_object(value: Any) -> Response:
    if not isinstance(value, dict):
        raise RemoteProtocolError(
            f"invalid reply from server: reply is {_describe(value)}, expected an object"
        )
    if value.get("jsonrpc") != VERSION:
        raise RemoteProtocolError('invalid reply from server: "jsonrpc" is not "2.0"')

    response_id = value.get("id", _MISSING)
    if response_id is _MISSING or (
        response_id is not None and type(response_id) not in _ID_TYPES
    ):
        raise RemoteProtocolError("invalid reply from server: missing or invalid id")

    has_result = "result" in value
    if has_result == ("error" in value):
        raise RemoteProtocolError(
            'invalid reply from server: expected exactly one of "result" and "error"'
        )
    if has_result:
        return Response(response_id, value["result"], None)
    return Response(response_id, None, _parse_error_object(value["error"]))


def _parse_error_object(error: Any) -> RemoteError:
    if (
        not isinstance(error, dict)
        or type(error.get("code")) is not int
        or not isinstance(error.get("message"), str)
    ):
        raise RemoteProtocolError(
            "invalid reply from server: error object needs an integer code "
            "and a string message"
        )
    return RemoteError(error["code"], error["message"], error.get("data"))
