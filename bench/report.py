"""
The printed result of a run: versions, the tables and the issue's targets,
each marked met or missed with the measured figure.
"""

from __future__ import annotations

import argparse
import math
import platform
import ssl
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bench import haproxy
from bench.stats import markdown_table, median, number, paired_ratio, ratio, with_spread

if TYPE_CHECKING:
    from bench.suite import Bench, Row

NETRPC = "netrpc, async client"
NETRPC_AUDIT = "netrpc, audit log and access policy on"
JSON_BOUND = "bound: the same with JSON-RPC envelopes (stdlib json)"
GRPC_ROWS = ("gRPC Python, mutual TLS, sync server and client", "gRPC Python, mutual TLS, asyncio")
MiB = 2**20


def versions() -> str:
    names = ["Twisted", "pyOpenSSL", "cryptography", "txjsonrpc-ng", "txJSON-RPC", "grpcio", "orjson"]
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    try:
        from OpenSSL import SSL

        parts.append(SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())
    except ImportError:
        parts.append(ssl.OPENSSL_VERSION)
    return ", ".join(parts)


class Figures:
    """Read the medians and round-by-round values of a run's results."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def values(self, label: str, mode: str, key: str) -> list[float]:
        return [result[key] for result in self.bench.results.get((label, mode), [])]

    def median(self, label: str, mode: str, key: str) -> float:
        return median(self.values(label, mode, key))

    def ratio(self, label: str, reference: str, mode: str, key: str = "rate") -> float:
        values, references = self.values(label, mode, key), self.values(reference, mode, key)
        if len(values) != len(references) or not values:
            return math.nan
        return paired_ratio(values, references)

    def cell(self, label: str, mode: str, key: str) -> str:
        return with_spread(self.values(label, mode, key))


def _missing(bench: Bench, row: Row) -> str | None:
    return bench.failures.get(row.label)


def calls_table(bench: Bench, figures: Figures) -> str:
    from bench.suite import CALL_ROWS

    header = [
        "system",
        "connection model",
        "sequential calls/s",
        "× netrpc",
        "32 in flight calls/s",
        "× netrpc",
        "seq p50 ms",
        "seq p99 ms",
        "server CPU µs/call",
        "client CPU µs/call",
    ]
    rows = []
    for row in CALL_ROWS:
        reason = _missing(bench, row)
        if reason is not None and not figures.values(row.label, "seq", "rate"):
            rows.append([row.label, row.connection, reason] + [""] * 7)
            continue
        cpu_mode = "32" if "32" in row.modes else "seq"
        cpu_note = "" if cpu_mode == "32" else " (seq)"
        rows.append(
            [
                row.label,
                row.connection,
                figures.cell(row.label, "seq", "rate"),
                ratio(figures.ratio(row.label, NETRPC, "seq")),
                figures.cell(row.label, "32", "rate") if "32" in row.modes else "n/a",
                ratio(figures.ratio(row.label, NETRPC, "32")) if "32" in row.modes else "",
                figures.cell(row.label, "seq", "p50_ms"),
                figures.cell(row.label, "seq", "p99_ms"),
                figures.cell(row.label, cpu_mode, "server_cpu_us") + cpu_note,
                figures.cell(row.label, cpu_mode, "client_cpu_us") + cpu_note,
            ]
        )
    return markdown_table(header, rows)


def _handshake_reference(label: str) -> str:
    keys = label.rpartition(", ")[2]
    return f"raw Twisted bound, {keys}"


def handshakes_table(bench: Bench, figures: Figures) -> str:
    from bench.suite import HANDSHAKE_ROWS

    header = [
        "server",
        "sequential handshakes/s",
        "× raw bound",
        "32 at once handshakes/s",
        "× raw bound",
        "seq p50 ms",
        "server CPU µs/handshake (32 at once)",
        "CPU × raw bound",
    ]
    rows = []
    for row in HANDSHAKE_ROWS:
        reason = _missing(bench, row)
        if reason is not None and not figures.values(row.label, "seq", "rate"):
            rows.append([row.label, reason] + [""] * 6)
            continue
        reference = _handshake_reference(row.label)
        rows.append(
            [
                row.label,
                figures.cell(row.label, "seq", "rate"),
                ratio(figures.ratio(row.label, reference, "seq")),
                figures.cell(row.label, "32", "rate"),
                ratio(figures.ratio(row.label, reference, "32")),
                figures.cell(row.label, "seq", "p50_ms"),
                figures.cell(row.label, "32", "server_cpu_us"),
                ratio(figures.ratio(row.label, reference, "32", "server_cpu_us")),
            ]
        )
    return markdown_table(header, rows)


def scale_table(bench: Bench, figures: Figures) -> str:
    from bench.suite import SCALE_IN_FLIGHT, SCALE_ROWS

    header = ["setup", f"calls/s, {SCALE_IN_FLIGHT} in flight", "× 1 worker", "server CPU µs/call, all workers"]
    rows = []
    for row in SCALE_ROWS:
        reason = _missing(bench, row)
        if reason is not None and not figures.values(row.label, "32", "rate"):
            rows.append([row.label, reason, "", ""])
            continue
        rows.append(
            [
                row.label,
                figures.cell(row.label, "32", "rate"),
                ratio(figures.ratio(row.label, SCALE_ROWS[0].label, "32")),
                figures.cell(row.label, "32", "server_cpu_us"),
            ]
        )
    return markdown_table(header, rows)


def _mode_cell(figures: Figures, row: Row, mode: str, key: str) -> str:
    return figures.cell(row.label, mode, key) if mode in row.modes else "n/a"


def _mode_ratio(figures: Figures, row: Row, reference: str, mode: str) -> str:
    return ratio(figures.ratio(row.label, reference, mode)) if mode in row.modes else ""


def _connections_per_daemon(bench: Bench, row: Row) -> str:
    """Return how HAProxy spread the row's connections, such as "1 + 1", one entry per distinct split."""
    results = [result for mode in row.modes for result in bench.results.get((row.label, mode), [])]
    if not results:
        return "n/a"
    splits = []
    for result in results:
        if "connections_per_daemon" not in result:
            continue
        split = " + ".join(str(count) for count in result["connections_per_daemon"].values())
        if split not in splits:
            splits.append(split)
    # Direct rows go through no proxy: their connections all reach the one daemon.
    return ", ".join(splits) if splits else str(row.connections)


def haproxy_table(bench: Bench, figures: Figures) -> str:
    from bench.suite import HAPROXY_DIRECT, HAPROXY_ROWS

    header = [
        "path",
        "connection model",
        "sequential calls/s",
        "× direct",
        "32 in flight calls/s",
        "× direct",
        "seq p50 ms",
        "HAProxy CPU µs/call, seq",
        "HAProxy CPU µs/call, 32 in flight",
        "daemon CPU µs/call, 32 in flight",
        "connections per daemon",
    ]
    rows = []
    for row in HAPROXY_ROWS:
        reason = _missing(bench, row)
        if reason is not None and not figures.values(row.label, row.modes[0], "rate"):
            rows.append([row.label, row.connection, reason] + [""] * (len(header) - 3))
            continue
        proxied = row != HAPROXY_DIRECT
        rows.append(
            [
                row.label,
                row.connection,
                _mode_cell(figures, row, "seq", "rate"),
                _mode_ratio(figures, row, HAPROXY_DIRECT.label, "seq"),
                _mode_cell(figures, row, "32", "rate"),
                _mode_ratio(figures, row, HAPROXY_DIRECT.label, "32"),
                _mode_cell(figures, row, "seq", "p50_ms"),
                _mode_cell(figures, row, "seq", "proxy_cpu_us") if proxied else "",
                _mode_cell(figures, row, "32", "proxy_cpu_us") if proxied else "",
                _mode_cell(figures, row, "32", "server_cpu_us"),
                _connections_per_daemon(bench, row),
            ]
        )
    return markdown_table(header, rows)


def memory_table(bench: Bench) -> str:
    header = ["server", "connections", "RSS before MiB", "RSS after MiB", "added MiB per 1,000"]
    rows = []
    for name, label in (("netrpc-memory", "netrpc"), ("bound-raw-memory", "raw Twisted bound")):
        results = bench.memory.get(name)
        if not results:
            rows.append([label, bench.failures.get(name, "not measured"), "", "", ""])
            continue
        result = results[-1]
        added = (result["rss_after"] - result["rss_before"]) / MiB * 1000 / result["connections"]
        rows.append(
            [
                label,
                str(result["connections"]),
                f"{result['rss_before'] / MiB:.1f}",
                f"{result['rss_after'] / MiB:.1f}",
                f"{added:.1f}",
            ]
        )
    return markdown_table(header, rows)


def _verdict(value: float, limit: float, at_least: bool, unit: str = "×") -> str:
    if math.isnan(value):
        return "not measured"
    shown = f"{value:.2f}{unit}" if unit == "×" else f"{value:.1f} {unit}"
    if (value >= limit) if at_least else (value <= limit):
        return f"met ({shown})"
    gap = (limit / value - 1) if at_least else (value / limit - 1)
    return f"missed ({shown}, {gap * 100:.0f}% short)" if at_least else f"missed ({shown}, {gap * 100:.0f}% over)"


def targets(bench: Bench, figures: Figures) -> str:
    best_grpc = max(
        (figures.median(label, "32", "rate") for label in GRPC_ROWS),
        key=lambda value: -1 if math.isnan(value) else value,
    )
    netrpc_32 = figures.median(NETRPC, "32", "rate")
    audit_label = NETRPC_AUDIT if figures.values(NETRPC_AUDIT, "32", "rate") else NETRPC
    audit_note = "" if audit_label == NETRPC_AUDIT else " (audit log not built yet: measured without it)"
    p99_ratio = figures.median(NETRPC, "seq", "p99_ms") / figures.median(JSON_BOUND, "seq", "p99_ms")
    lines = [
        ("32 in flight ≥ 0.8× the JSON bound", _verdict(figures.ratio(NETRPC, JSON_BOUND, "32"), 0.8, True)),
        ("32 in flight ≥ 6× gRPC's best mode", _verdict(netrpc_32 / best_grpc, 6.0, True)),
        ("sequential ≥ 0.85× the JSON bound", _verdict(figures.ratio(NETRPC, JSON_BOUND, "seq"), 0.85, True)),
        ("sequential p99 ≤ 1.5× the JSON bound's p99", _verdict(p99_ratio, 1.5, False)),
        (
            f"server CPU ≤ 40 µs/call at 32 in flight, audit on{audit_note}",
            _verdict(figures.median(audit_label, "32", "server_cpu_us"), 40.0, False, "µs"),
        ),
    ]
    for keys in ("P-256", "RSA-4096"):
        label = f"netrpc server, {keys}"
        lines.append(
            (
                f"handshakes/s ≥ 0.9× the raw bound, {keys} (32 at once)",
                _verdict(figures.ratio(label, _handshake_reference(label), "32"), 0.9, True),
            )
        )
    lines.append(("1,000 idle connections add ≤ 64 MiB", _memory_verdict(bench)))
    client_over_server = figures.median(NETRPC, "32", "client_cpu_us") / figures.median(
        NETRPC, "32", "server_cpu_us"
    )
    lines.append(
        ("async client CPU per call ≤ the server's (32 in flight)", _verdict(client_over_server, 1.0, False))
    )
    return markdown_table(["target", "result"], [[name, verdict] for name, verdict in lines])


def _memory_verdict(bench: Bench) -> str:
    results = bench.memory.get("netrpc-memory")
    if not results:
        return "not measured"
    result = results[-1]
    added = (result["rss_after"] - result["rss_before"]) / MiB * 1000 / result["connections"]
    return _verdict(added, 64.0, False, "MiB")


def render(bench: Bench, options: argparse.Namespace, elapsed: float) -> str:
    figures = Figures(bench)
    parts = [
        f"netrpc benchmark: {options.rounds} rounds of {options.seconds:g} s per figure "
        f"(median ±half the range), {elapsed / 60:.1f} minutes",
        versions(),
        "",
        "Calls: one client process, one server process, echo of a 40-byte string",
        calls_table(bench, figures),
        "",
        "Mutual-TLS handshakes",
        handshakes_table(bench, figures),
        "",
        "Worker processes sharing one listening port (one bench client process)",
        scale_table(bench, figures),
        "",
        "netrpc's async client direct and through HAProxy (shipped deploy/haproxy/haproxy.cfg, "
        f"TCP passthrough; {haproxy.version()})",
        haproxy_table(bench, figures),
        "",
        "Server memory",
        memory_table(bench),
        "",
        "Targets",
        targets(bench, figures),
    ]
    return "\n".join(parts)
