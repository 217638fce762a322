"""
The demo service, published when the server is given no ``--methods``.

Plain functions, as any service module can be: ``netrpc call ... multiply
6 7`` prints 42.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from netrpc import jsonrpc
from netrpc.exceptions import RPCError
from netrpc.identity import PeerIdentity
from netrpc.methods import pass_caller

__all__ = ["echo", "multiply", "sleep", "whoami"]

# Maximum sleep a caller may request, in seconds. It keeps the demo from
# holding calls open for long.
MAX_SLEEP_SECONDS = 10.0


def echo(value: Any) -> Any:
    """Return ``value`` unchanged."""
    return value


def multiply(a: float, b: float) -> float:
    """Return the product of two numbers."""
    for name, number in (("a", a), ("b", b)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise RPCError(
                jsonrpc.INVALID_PARAMS,
                "Invalid params",
                f"{name} is {number!r}, expected a number",
            )
    return a * b


def sleep(seconds: float) -> Deferred[float]:
    """Wait ``seconds`` (at most 10) without blocking other calls, then return it."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise RPCError(
            jsonrpc.INVALID_PARAMS, "Invalid params", f"seconds is {seconds!r}, expected a number"
        )
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise RPCError(
            jsonrpc.INVALID_PARAMS,
            "Invalid params",
            f"seconds is {seconds!r}, expected 0 to {MAX_SLEEP_SECONDS:g}",
        )
    return deferLater(reactor, seconds, lambda: seconds)


@pass_caller
def whoami(caller: PeerIdentity | None) -> dict[str, object] | None:
    """Return the identity in the caller's client certificate."""
    return None if caller is None else caller.as_dict()
