"""
The benchmark suite: start every server once, measure every row in
several rounds, and print one table with medians, spreads and ratios.

Each round measures every row once, in the same order, so slow drifts of
a shared machine hit every system alike; ratios are taken round by round
and their median is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import haproxy
from bench import pki as bench_pki
from bench import report
from bench.procs import ProcessFailed, ServerProcess, python_command, run_client, twistd_command

# In-flight calls of the pipelined column.
PIPELINE_DEPTH = 32

# Connections and calls in flight of the worker-scaling rows.
SCALE_CONNECTIONS = 8
SCALE_IN_FLIGHT = 64

# Room above 1,000 connections for the memory row's own warm-up connection.
MEMORY_MAX_CONNECTIONS = 1100

MODES = {"seq": 1, "32": PIPELINE_DEPTH}


@dataclass(frozen=True)
class Row:
    """One line of the table: a client kind against a server, in some modes."""

    label: str
    connection: str
    server: str
    kind: str
    modes: tuple[str, ...] = ("seq", "32")
    group: str = "calls"
    connections: int = 1
    in_flight: dict[str, int] = field(default_factory=dict)


CALL_ROWS = (
    Row("netrpc, async client", "one connection", "netrpc", "netrpc"),
    Row("netrpc, blocking client", "one connection", "netrpc", "blocking", modes=("seq",)),
    Row("netrpc, audit log and access policy on", "one connection", "netrpc-audit", "netrpc"),
    Row(
        "txJSON-RPC 0.5 netstring server + stock Proxy over TLS, P-256",
        "new TLS connection per call",
        "stock-netstring",
        "stock-netstring",
    ),
    Row(
        "txJSON-RPC 0.5 netstring server + stock Proxy over TLS, RSA-4096",
        "new TLS connection per call",
        "stock-netstring-rsa",
        "stock-netstring",
    ),
    Row(
        "tutorial: txJSON-RPC 0.5 over HTTPS with client certificates, P-256",
        "new TLS connection per call",
        "tutorial-https",
        "tutorial-https",
    ),
    Row(
        "tutorial: txJSON-RPC 0.5 over HTTPS with client certificates, RSA-4096",
        "new TLS connection per call",
        "tutorial-https-rsa",
        "tutorial-https",
    ),
    Row("gRPC Python, mutual TLS, sync server and client", "one HTTP/2 channel", "grpc-sync", "grpc-sync"),
    Row("gRPC Python, mutual TLS, asyncio", "one HTTP/2 channel", "grpc-aio", "grpc-aio"),
    Row("bound: raw Twisted netstring echo over mutual TLS", "one connection", "bound-raw", "bound-raw"),
    Row(
        "bound: the same with JSON-RPC envelopes (stdlib json)",
        "one connection",
        "bound-json",
        "bound-json",
    ),
)

HANDSHAKE_ROWS = (
    Row("netrpc server, P-256", "connect, handshake, close", "netrpc", "handshake", group="handshakes"),
    Row("raw Twisted bound, P-256", "connect, handshake, close", "bound-raw", "handshake", group="handshakes"),
    Row("netrpc server, RSA-4096", "connect, handshake, close", "netrpc-rsa", "handshake", group="handshakes"),
    Row(
        "raw Twisted bound, RSA-4096",
        "connect, handshake, close",
        "bound-raw-rsa",
        "handshake",
        group="handshakes",
    ),
)

SCALE_ROWS = (
    Row(
        "netrpc, 1 worker (reusePort)",
        f"{SCALE_CONNECTIONS} connections",
        "netrpc-1-worker",
        "bound-json",
        modes=("32",),
        group="scale",
        connections=SCALE_CONNECTIONS,
        in_flight={"32": SCALE_IN_FLIGHT},
    ),
    Row(
        "netrpc, 2 workers sharing the port (reusePort)",
        f"{SCALE_CONNECTIONS} connections",
        "netrpc-2-workers",
        "bound-json",
        modes=("32",),
        group="scale",
        connections=SCALE_CONNECTIONS,
        in_flight={"32": SCALE_IN_FLIGHT},
    ),
)


# netrpc's async client direct to a daemon, and through HAProxy with the
# shipped configuration to one and to two daemons that expect a PROXY
# header. With one connection, leastconn sends every call to one daemon,
# so the two-daemon row opens two connections, which go one to each.
HAPROXY_DIRECT = Row("direct to one daemon, no HAProxy", "one connection", "netrpc", "netrpc", group="haproxy")
HAPROXY_ROWS = (
    HAPROXY_DIRECT,
    Row(
        "through HAProxy to one daemon",
        "one connection, passed through",
        "netrpc-proxied-1",
        "netrpc",
        group="haproxy",
    ),
    Row(
        "through HAProxy to two daemons (leastconn)",
        "2 connections, passed through",
        "netrpc-proxied-2",
        "netrpc",
        modes=("32",),
        group="haproxy",
        connections=2,
    ),
)


def audit_policy_missing() -> str | None:
    """Say why the audit and policy row cannot run, or return None when it can."""
    from importlib.util import find_spec

    if find_spec("netrpc.audit") is None or find_spec("netrpc.policy") is None:
        return "not built yet"
    return None


def blocking_missing() -> str | None:
    from importlib.util import find_spec

    return "not built yet" if find_spec("netrpc.blocking") is None else None


UNAVAILABLE: dict[str, Callable[[], str | None]] = {
    "netrpc-audit": audit_policy_missing,
}
KIND_UNAVAILABLE: dict[str, Callable[[], str | None]] = {"blocking": blocking_missing}
GROUP_UNAVAILABLE: dict[str, Callable[[], str | None]] = {"haproxy": haproxy.missing}


class Bench:
    """The servers, certificates and results of one run."""

    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.pkis: dict[str, bench_pki.BenchPKI] = {}
        self.servers: dict[str, list[ServerProcess]] = {}
        self.proxies: dict[str, haproxy.HAProxyProcess] = {}
        self.results: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.failures: dict[str, str] = {}
        self.memory: dict[str, list[dict[str, Any]]] = defaultdict(list)

    # --- Certificates and servers -----------------------------------------

    def pki(self, keys: str) -> bench_pki.BenchPKI:
        if keys not in self.pkis:
            log(f"creating the {keys} certificates")
            self.pkis[keys] = bench_pki.create(self.workdir, keys)
        return self.pkis[keys]

    def server(self, name: str) -> list[ServerProcess]:
        """Start the server ``name`` unless it runs already; return its processes."""
        if name not in self.servers:
            self.servers[name] = self._start(name)
        return self.servers[name]

    def _start(self, name: str) -> list[ServerProcess]:
        keys = "rsa4096" if name.endswith("-rsa") else "p256"
        directory = str(self.pki(keys).directory)
        base = name.removesuffix("-rsa")
        if base in ("netrpc", "netrpc-memory"):
            extra = ["--max-connections", str(MEMORY_MAX_CONNECTIONS)] if base == "netrpc-memory" else []
            return [ServerProcess(name, netrpc_command(directory, "port=0", *extra))]
        if base == "netrpc-audit":
            return [ServerProcess(name, netrpc_command(directory, "port=0", *self._audit_options()))]
        if base == "netrpc-1-worker":
            return [ServerProcess(name, netrpc_command(directory, "port=0:reusePort=true"))]
        if base.startswith("netrpc-proxied-"):
            count = int(base.removeprefix("netrpc-proxied-"))
            listen = "port=0:proxyProtocol=true"
            return [ServerProcess(name, netrpc_command(directory, listen)) for _ in range(count)]
        if base == "netrpc-2-workers":
            first = ServerProcess(name, netrpc_command(directory, "port=0:reusePort=true"))
            listen = f"port={first.port}:reusePort=true"
            return [first, ServerProcess(name, netrpc_command(directory, listen))]
        if base.startswith("grpc-"):
            mode = base.removeprefix("grpc-")
            return [ServerProcess(name, python_command("bench.grpc_peer", mode, "--pki", directory))]
        kind = base.removesuffix("-memory")
        return [ServerProcess(name, python_command("bench.servers", kind, "--pki", directory))]

    def proxy(self, name: str) -> haproxy.HAProxyProcess:
        """Start HAProxy in front of the daemons of server ``name`` unless it runs already."""
        if name not in self.proxies:
            ports = [process.port for process in self.server(name)]
            self.proxies[name] = haproxy.start(self.workdir / f"haproxy-{name}", self.pki("p256"), ports)
        return self.proxies[name]

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit" / "audit.log"

    def _audit_options(self) -> list[str]:
        # The daemon opens the audit log after dropping root, so its folder
        # is open to the unprivileged user.
        self.workdir.chmod(0o755)
        self.audit_log.parent.mkdir(exist_ok=True)
        self.audit_log.parent.chmod(0o777)
        config = self.workdir / "audit-policy.toml"
        config.write_text(
            "[[policy.rule]]\n"
            f'identities = ["{bench_pki.CLIENT_NAME}"]\n'
            'methods = ["echo"]\n'
            "\n"
            "[audit]\n"
            f'destination = "{self.audit_log}"\n'
            'format = "text"\n'
        )
        return ["--config", str(config)]

    def stop(self) -> None:
        # Stop the proxies first, so that their health checks never reach a stopped daemon.
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        for processes in self.servers.values():
            for process in processes:
                process.stop()
        self.servers.clear()

    # --- Measuring --------------------------------------------------------

    def measure(self, row: Row, mode: str) -> None:
        if row.label in self.failures:
            return
        reason = (
            GROUP_UNAVAILABLE.get(row.group, _available)()
            or UNAVAILABLE.get(row.server, _available)()
            or KIND_UNAVAILABLE.get(row.kind, _available)()
        )
        if reason is not None:
            self.failures[row.label] = reason
            return
        try:
            result = self._run_client(row, mode)
        except ProcessFailed as error:
            log(f"{row.label} [{mode}] failed: {error}")
            self.failures[row.label] = f"failed: {str(error).splitlines()[0]}"
            return
        if row.server == "netrpc-audit" and not _has_lines(self.audit_log):
            self.failures[row.label] = "not built yet: the daemon wrote no audit log"
            return
        self.results[(row.label, mode)].append(result)
        log(f"{row.label} [{mode}]: {result['rate']:,.0f}/s, p50 {result['p50_ms']:.2f} ms")

    def _run_client(self, row: Row, mode: str) -> dict[str, Any]:
        """Start the row's servers (and proxy) if needed and run one load driver against them."""
        processes = self.server(row.server)
        if not row.server.startswith("netrpc-proxied-"):
            return run_client(self._client_arguments(row, mode, processes), self._time_limit())

        proxy = self.proxy(row.server)
        before = proxy.connections()
        result = run_client(self._client_arguments(row, mode, processes, proxy), self._time_limit())
        after = proxy.connections()
        # The table shows how leastconn spread the row's connections over the daemons.
        result["connections_per_daemon"] = {name: after[name] - before.get(name, 0) for name in sorted(after)}
        return result

    def _client_arguments(
        self,
        row: Row,
        mode: str,
        processes: Sequence[ServerProcess],
        proxy: haproxy.HAProxyProcess | None = None,
    ) -> list[str]:
        keys = "rsa4096" if row.server.endswith("-rsa") else "p256"
        arguments = [
            row.kind,
            "--port",
            str(proxy.port if proxy else processes[0].port),
            "--pki",
            str(self.pki(keys).directory),
            "--in-flight",
            str(row.in_flight.get(mode, MODES[mode])),
            "--connections",
            str(row.connections),
            "--warmup",
            str(self.options.warmup),
            "--seconds",
            str(self.options.seconds),
        ]
        for process in processes:
            arguments += ["--server-pid", str(process.pid)]
        if proxy:
            arguments += ["--proxy-pid", str(proxy.pid)]
        if row.server == "netrpc-audit":
            # Proves the policy is enforced: this call must be forbidden.
            arguments += ["--expect-forbidden", "multiply"]
        return arguments

    def _time_limit(self) -> float:
        return self.options.warmup + self.options.seconds + 90.0

    def measure_memory(self) -> None:
        """Hold 1,000 idle connections to a fresh netrpc server and a fresh bound."""
        for name in ("netrpc-memory", "bound-raw-memory"):
            if not _selected(self.options, name):
                continue
            try:
                (process,) = self._start(name)
            except ProcessFailed as error:
                self.failures[name] = f"failed: {str(error).splitlines()[0]}"
                continue
            try:
                arguments = [
                    "idle",
                    "--port",
                    str(process.port),
                    "--pki",
                    str(self.pki("p256").directory),
                    "--server-pid",
                    str(process.pid),
                    "--idle-connections",
                    "1000",
                ]
                result = run_client(arguments, 300.0)
                self.memory[name].append(result)
                growth = (result["rss_after"] - result["rss_before"]) / 2**20
                log(f"{name}: {result['connections']} idle connections add {growth:.1f} MiB")
            except ProcessFailed as error:
                self.failures[name] = f"failed: {str(error).splitlines()[0]}"
            finally:
                process.stop()

    def run(self) -> None:
        rows = [
            row
            for row in CALL_ROWS + HANDSHAKE_ROWS + SCALE_ROWS + HAPROXY_ROWS
            if _selected(self.options, row.label)
        ]
        proxied = [row for row in rows if row.group == "haproxy"]
        if proxied and HAPROXY_DIRECT not in rows:
            # The HAProxy rows are read as ratios to the direct row of the same round.
            rows.insert(rows.index(proxied[0]), HAPROXY_DIRECT)
        for round_number in range(1, self.options.rounds + 1):
            log(f"round {round_number} of {self.options.rounds}")
            for row in rows:
                for mode in row.modes:
                    self.measure(row, mode)
        if not self.options.no_memory:
            self.measure_memory()


def _available() -> None:
    return None


def _has_lines(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _selected(options: argparse.Namespace, label: str) -> bool:
    return not options.only or any(part.lower() in label.lower() for part in options.only)


def netrpc_command(pki_directory: str, listen: str, *extra: str) -> list[str]:
    """``twistd securerpc`` serving the demo service (its ``echo``) on loopback."""
    arguments = [
        "--pki",
        pki_directory,
        "--listen",
        f"mtls:{listen}:interface=127.0.0.1",
        "--methods",
        "netrpc.demo",
        *extra,
    ]
    if os.geteuid() == 0:
        # The daemon refuses to run methods as root.
        arguments += ["--user", "nobody"]
    return twistd_command(*arguments)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure netrpc against its peers and print one table.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure [default: 3]")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run [default: 3]")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per run [default: 0.5]")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="measure only rows whose label contains TEXT, case-insensitive (repeatable; "
        "--only haproxy selects the HAProxy rows)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the 1,000 idle connections")
    parser.add_argument("--json", type=Path, help="also write every raw result to this file")
    options = parser.parse_args(argv)
    for name in ("rounds", "seconds"):
        if getattr(options, name) <= 0:
            parser.error(f"--{name} must be above 0")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    workdir = Path(tempfile.mkdtemp(prefix="netrpc-bench-"))
    bench = Bench(options, workdir)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report.render(bench, options, time.monotonic() - started))
    if options.json:
        raw = {
            "results": {f"{label} [{mode}]": values for (label, mode), values in bench.results.items()},
            "memory": bench.memory,
            "failures": bench.failures,
        }
        options.json.write_text(json.dumps(raw, indent=2))
    return 0
