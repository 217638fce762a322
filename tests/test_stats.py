"""Tests for the counters snapshot, the metrics_listen check and the Prometheus text."""

from __future__ import annotations

from collections import Counter

import pytest

from netrpc.exceptions import ConfigurationError
from netrpc.handshake import HandshakeStats
from netrpc.stats import ServerStats, check_metrics_listen, render_metrics, snapshot


def sample() -> dict[str, object]:
    stats = ServerStats()
    stats.count_call(None)
    stats.count_call(-32003)
    stats.count_call(-32003)
    stats.count_call(None, lost=True)
    stats.reloads = 2
    stats.failed_reloads = 1
    stats.connections = 5
    endpoints = [
        HandshakeStats(completed=3, refused=1, rejections=Counter({"revoked": 2})),
        HandshakeStats(completed=2, rejections=Counter({"revoked": 1, "unknown CA": 4})),
    ]
    return snapshot(stats, uptime=12.3456, open_connections=2, calls_in_flight=1, handshakes=endpoints)


def test_snapshot() -> None:
    assert sample() == {
        "uptime": 12.346,
        "calls": {"total": 4, "errors": {"-32003": 2}, "lost": 1, "in_flight": 1},
        "connections": {
            "open": 2,
            "total": 5,
            "over_identity_cap": 0,
            "closed_by_reload": 0,
            "refused_at_max": 1,
        },
        "handshakes": {"completed": 5, "failed": {"revoked": 3, "unknown CA": 4}},
        "reloads": {"succeeded": 2, "failed": 1},
    }


def test_prometheus_text() -> None:
    body, content_type = render_metrics(sample)
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in (
        "netrpc_calls_total 4.0",
        'netrpc_call_errors_total{code="-32003"} 2.0',
        "netrpc_calls_in_flight 1.0",
        "netrpc_open_connections 2.0",
        'netrpc_handshake_failures_total{reason="unknown CA"} 4.0',
        'netrpc_reloads_total{result="failed"} 1.0',
        'netrpc_closed_connections_total{reason="max connections"} 1.0',
    ):
        assert line in text.splitlines()


@pytest.mark.parametrize(
    "description",
    [
        "tcp:9700:interface=127.0.0.1",
        "tcp:port=0:interface=127.0.0.2",
        "tcp:9700:interface=\\:\\:1",
        "unix:/run/securerpc/metrics.sock",
    ],
)
def test_local_listen_accepted(description: str) -> None:
    assert check_metrics_listen(description) == description


@pytest.mark.parametrize(
    "description",
    ["tcp:9700", "tcp:9700:interface=0.0.0.0", "tcp:9700:interface=10.0.0.1", "ssl:9700", "tcp:9700:interface=localhost"],
)
def test_remote_listen_rejected(description: str) -> None:
    with pytest.raises(ConfigurationError, match="is not local-only"):
        check_metrics_listen(description, "test.toml")
