"""
A txJSON-RPC-style service with methods under ``compute.``, for access
policy tests: load it with ``--methods compute_service:Service``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from txjsonrpc_ng.jsonrpc import BaseSubhandler

# Every call that ran lands here, so in-process tests can check that a
# refused call never reached its method.
ran: list[str] = []


class Compute(BaseSubhandler):  # type: ignore[misc]
    """The ``compute.`` methods."""

    def jsonrpc_add(self, a: float, b: float) -> float:
        """Return the sum of ``a`` and ``b``."""
        ran.append("compute.add")
        return a + b

    def jsonrpc_sleep(self, seconds: float) -> Deferred[float]:
        """Return ``seconds`` after waiting that long without blocking the reactor."""
        from twisted.internet import reactor

        ran.append("compute.sleep")
        return deferLater(reactor, seconds, lambda: seconds)


class Service(BaseSubhandler):  # type: ignore[misc]
    """A root handler with ``ping`` and the ``compute.`` sub-handler."""

    def __init__(self) -> None:
        super().__init__()
        self.putSubHandler("compute", Compute())

    def jsonrpc_ping(self) -> str:
        """Return 'pong'."""
        ran.append("ping")
        return "pong"
