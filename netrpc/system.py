"""
The ``system.`` methods: txJSON-RPC's introspection plus ``system.health``.
"""

from __future__ import annotations

from typing import Any

from txjsonrpc_ng.jsonrpc import Introspection

from netrpc import __version__


class SystemHandler(Introspection):  # type: ignore[misc]
    """
    txJSON-RPC's ``system.listMethods``, ``system.methodHelp`` and
    ``system.methodSignature``, and ``system.health`` for load balancers and
    monitoring.
    """

    def __init__(self, parent: Any, *, instance: str, started: float, clock: Any) -> None:
        super().__init__(parent)
        self._instance = instance
        self._started = started
        self._clock = clock

    def jsonrpc_health(self) -> dict[str, Any]:
        """Return that the daemon is serving, its instance name, version and uptime in seconds."""
        return {
            "status": "serving",
            "instance": self._instance,
            "version": __version__,
            "uptime": round(self._clock.seconds() - self._started, 3),
        }
