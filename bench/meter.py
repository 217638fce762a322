"""
The measured stretch of one load run, shared by every client driver.

A run warms up first, then counts the calls that finish within a window of
fixed length. The window opens and closes at the first call that finishes
after each boundary, so no timer is needed and the drivers for Twisted,
asyncio and blocking code all use it the same way. At both ends it reads
the CPU time of this process, of the server processes and of any proxy
between them, so the CPU per call covers exactly the counted calls'
stretch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat", "rb") as stream:
        text = stream.read()
    # The command name in parentheses may contain spaces, so the fields are
    # counted after it. utime and stime are fields 14 and 15 of the line.
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    """Return the resident memory of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


@dataclass
class Result:
    """The result of one load run; the fields ending in ``_us`` are per call."""

    calls: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    client_cpu_us: float
    server_cpu_us: float | None
    proxy_cpu_us: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Window:
    """
    Count calls during ``seconds`` after a ``warmup``.

    Drivers call ``record(started, finished)`` with ``time.perf_counter()``
    values after every call and stop making calls once ``done`` is true.
    """

    def __init__(
        self, warmup: float, seconds: float, server_pids: Sequence[int], proxy_pids: Sequence[int] = ()
    ) -> None:
        self.server_pids = tuple(server_pids)
        self.proxy_pids = tuple(proxy_pids)
        self._opens_at = time.perf_counter() + warmup
        self._seconds = seconds
        self._closes_at = float("inf")
        self.open = False
        self.done = False
        self._latencies: list[float] = []
        self._begin: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self._end: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def record(self, started: float, finished: float) -> None:
        if self.done:
            return
        if not self.open:
            if finished >= self._opens_at:
                self.open = True
                self._begin = self._sample(finished)
                self._closes_at = finished + self._seconds
            return
        if finished >= self._closes_at:
            self.done = True
            self._end = self._sample(finished)
            return
        self._latencies.append(finished - started)

    def _sample(self, now: float) -> tuple[float, float, float, float]:
        server = sum(process_cpu_seconds(pid) for pid in self.server_pids)
        proxy = sum(process_cpu_seconds(pid) for pid in self.proxy_pids)
        return now, time.process_time(), server, proxy

    def result(self) -> Result:
        """Summarise the window; call it once ``done`` is true."""
        calls = len(self._latencies)
        if not self.done or calls == 0:
            raise RuntimeError("the load run ended before its window closed with calls in it")
        seconds = self._end[0] - self._begin[0]
        latencies = sorted(self._latencies)
        return Result(
            calls=calls,
            seconds=seconds,
            rate=calls / seconds,
            p50_ms=_percentile(latencies, 0.50) * 1e3,
            p99_ms=_percentile(latencies, 0.99) * 1e3,
            client_cpu_us=(self._end[1] - self._begin[1]) / calls * 1e6,
            server_cpu_us=(self._end[2] - self._begin[2]) / calls * 1e6
            if self.server_pids
            else None,
            proxy_cpu_us=(self._end[3] - self._begin[3]) / calls * 1e6 if self.proxy_pids else None,
        )


def _percentile(ordered: list[float], fraction: float) -> float:
    index = min(len(ordered) - 1, int(fraction * len(ordered)))
    return ordered[index]
