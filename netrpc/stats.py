"""
The daemon's counters, as ``system.stats`` returns them and, optionally, in
Prometheus text format on a local-only HTTP listener.

``ServerStats`` contains the counters that only grow. The values that go up
and down (open connections, calls in flight) and the handshake counters of
each endpoint are read when a snapshot is taken, so every number in one
snapshot comes from the same moment.

The Prometheus listener needs the optional ``prometheus_client`` package
(``pip install netrpc[metrics]``) and accepts only ``tcp:`` on a loopback
interface or ``unix:``, because the counters reveal who calls what.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netrpc.exceptions import ConfigurationError
from netrpc.handshake import HandshakeStats

__all__ = [
    "ServerStats",
    "build_metrics_resource",
    "check_metrics_listen",
    "snapshot",
]

METRIC_PREFIX = "netrpc"


@dataclass
class ServerStats:
    """Counters of the daemon since it started."""

    # Calls that ended, with or without error, including refused ones.
    calls: int = 0
    # Calls that ended with an error, by JSON-RPC error code.
    errors: Counter[int] = field(default_factory=Counter)
    # Calls whose connection closed before they ended.
    lost_calls: int = 0
    # Connections whose caller was identified after the handshake.
    connections: int = 0
    # Connections closed because their identity had max_connections open.
    connections_over_cap: int = 0
    # Connections closed by a reload: certificate revoked, or no rule left.
    closed_by_reload: int = 0
    reloads: int = 0
    failed_reloads: int = 0

    def count_call(self, error_code: int | None, *, lost: bool = False) -> None:
        """Count one call that ended, failed with ``error_code`` or was lost."""
        self.calls += 1
        if lost:
            self.lost_calls += 1
        elif error_code is not None:
            self.errors[error_code] += 1


def snapshot(
    stats: ServerStats,
    *,
    uptime: float,
    open_connections: int,
    calls_in_flight: int,
    handshakes: Iterable[HandshakeStats],
) -> dict[str, Any]:
    """Return every counter as JSON-serializable data, for ``system.stats``."""
    completed, refused = 0, 0
    failures: Counter[str] = Counter()
    for endpoint in handshakes:
        completed += endpoint.completed
        refused += endpoint.refused
        failures.update(endpoint.rejections)

    return {
        "uptime": round(uptime, 3),
        "calls": {
            "total": stats.calls,
            "errors": {str(code): count for code, count in sorted(stats.errors.items())},
            "lost": stats.lost_calls,
            "in_flight": calls_in_flight,
        },
        "connections": {
            "open": open_connections,
            "total": stats.connections,
            "over_identity_cap": stats.connections_over_cap,
            "closed_by_reload": stats.closed_by_reload,
            "refused_at_max": refused,
        },
        "handshakes": {"completed": completed, "failed": dict(sorted(failures.items()))},
        "reloads": {"succeeded": stats.reloads, "failed": stats.failed_reloads},
    }


# --- Prometheus ------------------------------------------------------------


def check_metrics_listen(description: str, source: str = "the config file") -> str:
    """
    Return ``description`` if it is a local-only Twisted endpoint: ``tcp:``
    with an ``interface`` on loopback, or ``unix:``. Raise ``ConfigurationError``
    otherwise.
    """
    prefix, options = _split_endpoint(description)
    if prefix == "unix":
        return description
    if prefix == "tcp":
        interface = options.get("interface", "")
        try:
            loopback = ipaddress.ip_address(interface).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return description
    raise ConfigurationError(
        f"metrics_listen {description!r} in {source} is not local-only; write "
        "tcp:PORT:interface=127.0.0.1 or unix:/run/securerpc/metrics.sock, because "
        "the counters show which clients call what"
    )


def _split_endpoint(description: str) -> tuple[str, dict[str, str]]:
    """
    Split a Twisted server endpoint string into its prefix and its
    ``name=value`` options; positional values such as the port are skipped.
    A backslash takes the next character literally, as in Twisted.
    """
    fields, current = [], ""
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current += next(characters, "")
        elif character == ":":
            fields.append(current)
            current = ""
        else:
            current += character
    fields.append(current)

    options = {}
    for field_text in fields[1:]:
        name, equals, value = field_text.partition("=")
        if equals:
            options[name] = value
    return fields[0], options


def _metric_families(data: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    name = METRIC_PREFIX
    calls, connections = data["calls"], data["connections"]

    yield CounterMetricFamily(f"{name}_calls", "Calls that ended, including refused ones.", value=calls["total"])
    errors = CounterMetricFamily(f"{name}_call_errors", "Calls that ended with an error.", labels=["code"])
    for code, count in calls["errors"].items():
        errors.add_metric([code], count)
    yield errors
    yield CounterMetricFamily(f"{name}_lost_calls", "Calls whose connection closed first.", value=calls["lost"])
    yield GaugeMetricFamily(f"{name}_calls_in_flight", "Calls running now.", value=calls["in_flight"])

    yield GaugeMetricFamily(f"{name}_open_connections", "Open connections.", value=connections["open"])
    yield CounterMetricFamily(
        f"{name}_connections", "Connections with a verified client.", value=connections["total"]
    )
    closed = CounterMetricFamily(
        f"{name}_closed_connections", "Connections the daemon closed, by reason.", labels=["reason"]
    )
    closed.add_metric(["identity cap"], connections["over_identity_cap"])
    closed.add_metric(["reload"], connections["closed_by_reload"])
    closed.add_metric(["max connections"], connections["refused_at_max"])
    yield closed

    handshakes = data["handshakes"]
    failed = CounterMetricFamily(
        f"{name}_handshake_failures", "Rejected TLS handshakes, by reason.", labels=["reason"]
    )
    for reason, count in handshakes["failed"].items():
        failed.add_metric([reason], count)
    yield failed
    yield CounterMetricFamily(
        f"{name}_handshakes", "Completed TLS handshakes.", value=handshakes["completed"]
    )

    reloads = CounterMetricFamily(f"{name}_reloads", "Reloads, by result.", labels=["result"])
    reloads.add_metric(["succeeded"], data["reloads"]["succeeded"])
    reloads.add_metric(["failed"], data["reloads"]["failed"])
    yield reloads
    yield GaugeMetricFamily(f"{name}_uptime_seconds", "Seconds since the daemon started.", value=data["uptime"])


class _SnapshotCollector:
    """A prometheus_client collector that reads one snapshot per scrape."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        return _metric_families(self._read())


def render_metrics(read: Callable[[], dict[str, Any]]) -> tuple[bytes, str]:
    """Return the Prometheus text exposition of a snapshot and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(read))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def build_metrics_resource(read: Callable[[], dict[str, Any]]) -> Any:
    """
    Build the ``twisted.web`` resource that serves the counters. It renders
    in the reactor thread, so a scrape never reads counters mid-update.

    Raise ``ConfigurationError`` when ``prometheus_client`` is missing.
    """
    try:
        # Everything a scrape imports, imported now: after a start as root
        # the service user may be unable to read the installation.
        import prometheus_client.core  # noqa: F401
        import prometheus_client.exposition  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "metrics_listen needs the prometheus_client package; install it with "
            "'pip install netrpc[metrics]' or remove metrics_listen"
        ) from None
    from twisted.web.resource import Resource

    class MetricsResource(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            body, content_type = render_metrics(read)
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            return body

    return MetricsResource()
