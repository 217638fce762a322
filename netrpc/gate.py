"""
The daemon's ``ConnectionObserver``: it enforces the access policy and the
per-identity caps, writes the audit log and keeps the counters.

Each connection gets its ``Access`` compiled once, when its caller is
identified after the handshake. Each call is then checked against it
before the method runs. A reload swaps the policy and recompiles the access
of every open connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from netrpc._plural import plural
from netrpc import jsonrpc
from netrpc.audit import AuditLog, AuditRecord, CallerFields, caller_fields
from netrpc.handshake import RepeatLimiter
from netrpc.identity import PeerIdentity, format_serial
from netrpc.jsonrpc import Reply, Request
from netrpc.policy import Access, Policy, access_for
from netrpc.protocol import ConnectionObserver, RPCServerProtocol
from netrpc.stats import ServerStats

__all__ = ["CallGate", "describe_identity"]

FORBIDDEN_MESSAGE = "forbidden"

log = Logger(namespace="netrpc.policy")


def describe_identity(identity: PeerIdentity | None) -> str:
    """Name a caller in log lines: its common name and certificate serial."""
    if identity is None:
        return "a caller without certificate"
    return f"{identity.common_name!r} (serial {format_serial(identity.serial)})"


def _identity_key(identity: PeerIdentity | None) -> tuple[str, ...]:
    # Certificates with the same names are one identity for the caps, so
    # a renewed certificate shares its predecessor's budget.
    return identity.names() if identity is not None else ()


@dataclass
class _Usage:
    """The connections and calls in flight of one identity, across all its connections."""

    connections: int = 0
    in_flight: int = 0


@dataclass
class _ConnectionState:
    access: Access
    key: tuple[str, ...]
    # The caller's audit fields, formatted at the connection's first audit
    # line and dropped with the connection.
    audit_caller: CallerFields | None = None


class CallGate(ConnectionObserver):
    """
    Enforce ``policy`` (None: every caller may call everything), record
    each call in ``audit`` when it is given, and count in ``stats``.
    """

    def __init__(
        self,
        policy: Policy | None,
        *,
        clock: IReactorTime,
        stats: ServerStats | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.policy = policy
        self.stats = stats or ServerStats()
        self.audit = audit
        self.calls_in_flight = 0
        self._clock = clock
        self._connections: dict[RPCServerProtocol, _ConnectionState] = {}
        self._usage: dict[tuple[str, ...], _Usage] = {}
        self._rejection_log = RepeatLimiter(clock, self._report_suppressed)

    @property
    def open_connections(self) -> int:
        """Connections whose caller is identified and that are still open."""
        return len(self._connections)

    def access_of(self, identity: PeerIdentity | None) -> Access:
        """Compile what ``identity`` may do under the current policy."""
        return access_for(self.policy, identity)

    # --- ConnectionObserver hooks ------------------------------------------

    def connection_identified(self, connection: RPCServerProtocol) -> str | None:
        access = self.access_of(connection.caller)
        key = _identity_key(connection.caller)
        usage = self._usage.setdefault(key, _Usage())
        cap = access.max_connections
        if cap is not None and usage.connections >= cap:
            self.stats.connections_over_cap += 1
            if not usage.connections and not usage.in_flight:
                del self._usage[key]
            return (
                f"{describe_identity(connection.caller)} already has {plural(cap, 'connection')} open, "
                "the max_connections of its policy rule"
            )

        usage.connections += 1
        self.stats.connections += 1
        self._connections[connection] = _ConnectionState(access, key)
        return None

    def connection_lost(self, connection: RPCServerProtocol) -> None:
        state = self._connections.pop(connection, None)
        if state is None:
            return
        usage = self._usage[state.key]
        usage.connections -= 1
        self._drop_idle_usage(state.key, usage)

    def call_starting(self, connection: RPCServerProtocol, request: Request) -> Reply | None:
        state = self._connections.get(connection)
        if state is None:
            # A connection rejected at identification never runs calls; this
            # guards against a call that arrives without one.
            return self._reject_call(connection, request, jsonrpc.FORBIDDEN, "the connection is not admitted")

        if not state.access.allows(request.method):
            return self._reject_call(
                connection, request, jsonrpc.FORBIDDEN, "the access policy does not allow it"
            )
        usage = self._usage[state.key]
        cap = state.access.max_in_flight
        if cap is not None and usage.in_flight >= cap:
            return self._reject_call(
                connection,
                request,
                jsonrpc.OVERLOADED,
                f"the caller already has {plural(cap, 'call')} in flight, the max_in_flight of its policy rule",
            )

        usage.in_flight += 1
        self.calls_in_flight += 1
        return None

    def call_finished(
        self, connection: RPCServerProtocol, request: Request, reply: Reply | None, duration: float
    ) -> None:
        state = self._connections.get(connection)
        self.calls_in_flight -= 1
        if state is not None:
            usage = self._usage[state.key]
            usage.in_flight -= 1
        else:
            # The connection is gone: its usage entry counts only calls now.
            usage = self._usage[_identity_key(connection.caller)]
            usage.in_flight -= 1
            self._drop_idle_usage(_identity_key(connection.caller), usage)

        code = reply["error"]["code"] if reply is not None and "error" in reply else None
        self.stats.count_call(code, lost=reply is None)
        if self.audit is not None:
            self._audit(connection, request, reply, duration)

    # --- Rejected calls -------------------------------------------------------------

    def _reject_call(
        self, connection: RPCServerProtocol, request: Request, code: int, reason: str
    ) -> Reply:
        if code == jsonrpc.FORBIDDEN:
            reply = jsonrpc.error_reply(request.id, code, FORBIDDEN_MESSAGE)
        else:
            reply = jsonrpc.error_reply(request.id, code, data=reason)

        self.stats.count_call(code)
        if self._rejection_log.allow(connection.peer.rpartition(":")[0]):
            log.warn(
                "Rejected call to {method!r} from {identity} at {peer}: {reason}",
                method=request.method,
                identity=describe_identity(connection.caller),
                peer=connection.peer,
                reason=reason,
            )
        if self.audit is not None:
            self._audit(connection, request, reply, 0.0)
        return reply

    def _report_suppressed(self, host: str, count: int) -> None:
        log.warn(
            "Suppressed {lines} about {host} in the last {window:g} s",
            lines=plural(count, "more rejected-call line"),
            count=count,
            host=host,
            window=self._rejection_log.window,
        )

    def _audit(
        self, connection: RPCServerProtocol, request: Request, reply: Reply | None, duration: float
    ) -> None:
        assert self.audit is not None
        self.audit.record(
            AuditRecord(
                started=self._clock.seconds() - duration,
                peer=connection.peer,
                identity=connection.caller,
                method=request.method,
                params=request.params,
                reply=reply,
                duration=duration,
            ),
            caller=self._audit_caller(connection),
        )

    def _audit_caller(self, connection: RPCServerProtocol) -> CallerFields | None:
        """
        Return the connection's caller fields, formatted at its first audit
        line. Return None once the connection is gone, so the record's own are used.
        """
        state = self._connections.get(connection)
        if state is None:
            return None
        if state.audit_caller is None:
            state.audit_caller = caller_fields(connection.peer, connection.caller)
        return state.audit_caller

    def _drop_idle_usage(self, key: tuple[str, ...], usage: _Usage) -> None:
        if not usage.connections and not usage.in_flight:
            self._usage.pop(key, None)

    # --- Reload ---------------------------------------------------------------

    def replace_policy(self, policy: Policy | None) -> list[tuple[RPCServerProtocol, str]]:
        """
        Use ``policy`` for new connections and for the next calls of open
        ones. Return the open connections to close, each with the reason:
        those whose identity matched a rule (or had no policy to obey)
        before and matches none now.
        """
        self.policy = policy
        to_close = []
        for connection, state in self._connections.items():
            access = self.access_of(connection.caller)
            if state.access.matched and not access.matched:
                reason = "the reloaded access policy has no rule for its identity any more"
                to_close.append((connection, reason))
            state.access = access
        return to_close

    def connections(self) -> list[RPCServerProtocol]:
        """Return the open, identified connections."""
        return list(self._connections)
