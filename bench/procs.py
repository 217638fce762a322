"""
The processes of a benchmark run: servers that stay up for the whole run
and client drivers that run once each, every one bounded in time and
stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Every server logs this once it listens; the bench reads the port from it.
_LISTENING = re.compile(r"Listening on (?P<host>[0-9a-fA-F.:]+) port (?P<port>\d+)")

# Seconds a server may take to start listening, and to stop on SIGTERM.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class ProcessFailed(RuntimeError):
    """A bench process failed to start, exited early or timed out."""


class ServerProcess:
    """One server under test, with the lines it has logged."""

    def __init__(self, name: str, command: Sequence[str]) -> None:
        self.name = name
        self.command = list(command)
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.process.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for_port()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise ProcessFailed(f"server {self.name} exited:\n{self.output()}")
            self.lines.append(line)
            if found := _LISTENING.search(line):
                return int(found["port"])
        self.stop()
        raise ProcessFailed(f"server {self.name} did not listen in {START_TIMEOUT:g} s")

    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines[-40:])

    def stop(self) -> None:
        """Send SIGTERM, wait, and kill the process if it outlives ``STOP_TIMEOUT``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def python_command(module: str, *arguments: str) -> list[str]:
    """Return the command that runs ``python -m module`` in this interpreter."""
    return [sys.executable, "-m", module, *arguments]


def twistd_command(*arguments: str) -> list[str]:
    """Return the command that runs ``twistd -n securerpc`` from this interpreter's environment."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    return [twistd, "--nodaemon", "--pidfile=", "securerpc", *arguments]


def run_client(arguments: Sequence[str], time_limit: float) -> dict[str, Any]:
    """
    Run one ``bench.load`` driver to its end and return its JSON result.

    Raises ``ProcessFailed`` with the driver's error output when it fails
    or outlives ``time_limit`` seconds (it is killed then).
    """
    process = subprocess.Popen(
        python_command("bench.load", *arguments),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(timeout=time_limit)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=10)
        raise ProcessFailed(f"load {arguments[0]} ran past {time_limit:g} s: {_tail(err)}")
    lines = out.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        raise ProcessFailed(f"load {arguments[0]} failed: {_tail(err)}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _tail(data: bytes) -> str:
    return "\n".join(data.decode("utf-8", "replace").strip().splitlines()[-12:])
