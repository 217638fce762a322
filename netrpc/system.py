"""
The ``system.`` methods: txJSON-RPC's introspection, filtered by the access
policy, plus ``system.health`` and ``system.stats``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from txjsonrpc_ng.jsonrpc import Introspection

from netrpc import __version__, jsonrpc
from netrpc.exceptions import RPCError
from netrpc.identity import PeerIdentity
from netrpc.methods import pass_caller
from netrpc.policy import UNRESTRICTED, Access


def _unrestricted(identity: PeerIdentity | None) -> Access:
    return UNRESTRICTED


class SystemHandler(Introspection):
    """
    txJSON-RPC's ``system.listMethods``, ``system.methodHelp`` and
    ``system.methodSignature``, ``system.health`` for load balancers and
    monitoring, and ``system.stats`` with the daemon's counters.

    ``access_of`` returns what a caller may call: ``listMethods`` lists
    only those methods, and the help and signature of any other method are
    refused as ``FORBIDDEN``. ``stats`` returns the counters.
    """

    def __init__(
        self,
        parent: Any,
        *,
        instance: str,
        started: float,
        clock: Any,
        stats: Callable[[], dict[str, Any]],
        access_of: Callable[[PeerIdentity | None], Access] = _unrestricted,
    ) -> None:
        super().__init__(parent)
        self._instance = instance
        self._started = started
        self._clock = clock
        self._stats = stats
        self._access_of = access_of

    @pass_caller
    def jsonrpc_listMethods(self, *, caller: PeerIdentity | None = None) -> list[str]:
        """Return the names of the methods the caller may call, sorted."""
        access = self._access_of(caller)
        return [name for name in super().jsonrpc_listMethods() if access.allows(name)]

    @pass_caller
    def jsonrpc_methodHelp(self, method: str, *, caller: PeerIdentity | None = None) -> str:
        """Return the documentation of ``method``, one the caller may call."""
        self._check_allowed(method, caller)
        text: str = super().jsonrpc_methodHelp(method)
        return text

    @pass_caller
    def jsonrpc_methodSignature(self, method: str, *, caller: PeerIdentity | None = None) -> Any:
        """Return the type signatures of ``method``, one the caller may call, or ''."""
        self._check_allowed(method, caller)
        return super().jsonrpc_methodSignature(method)

    def _check_allowed(self, method: str, caller: PeerIdentity | None) -> None:
        if not isinstance(method, str):
            raise RPCError(jsonrpc.INVALID_PARAMS, "Invalid params", f"method must be a string, not {method!r}")
        if not self._access_of(caller).allows(method):
            raise RPCError(jsonrpc.FORBIDDEN, "forbidden")

    def jsonrpc_health(self) -> dict[str, Any]:
        """Return that the daemon is serving, its instance name, version and uptime in seconds."""
        return {
            "status": "serving",
            "instance": self._instance,
            "version": __version__,
            "uptime": round(self._clock.seconds() - self._started, 3),
        }

    def jsonrpc_stats(self) -> dict[str, Any]:
        """Return the daemon's counters: calls, errors by code, connections, handshakes, reloads."""
        return self._stats()
