"""
Run ``twistd -n securerpc`` as a separate process for end-to-end tests.
"""

from __future__ import annotations

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

TWISTD = str(Path(sys.executable).with_name("twistd"))

# The daemon logs one line per listening port; tests listen on port 0 and
# read the port the kernel chose from this line.
_LISTENING = re.compile(r"Listening on (?P<host>[0-9a-fA-F.:]+) port (?P<port>\d+)")


class DaemonProcess:
    """A ``twistd -n securerpc`` child process and the lines it has logged."""

    def __init__(
        self,
        arguments: Sequence[str],
        cwd: Path,
        twistd_arguments: Sequence[str] = (),
        *,
        new_session: bool = False,
    ):
        """``new_session`` starts the daemon in a process group of its own, for signals to the group."""
        command = [TWISTD, "--nodaemon", "--pidfile=", *twistd_arguments, "securerpc", *arguments]
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            start_new_session=new_session,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Return the first logged line matching ``pattern``, waiting up to ``timeout`` seconds."""
        expression = re.compile(pattern)
        for line in self.lines:
            if found := expression.search(line):
                return found

        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                # Reap the process and close its pipe, so a failed start
                # leaves no unraisable warning for a later test to trip on.
                self.wait_for_exit(timeout=10)
                raise AssertionError(f"daemon exited before logging {pattern!r}:\n{self.output()}")
            self.lines.append(line)
            if found := expression.search(line):
                return found
        raise AssertionError(f"daemon did not log {pattern!r} in {timeout} s:\n{self.output()}")

    def wait_for_port(self, timeout: float = 20.0) -> int:
        """Wait until the daemon listens and return its port."""
        return int(self.wait_for_line(_LISTENING.pattern, timeout)["port"])

    def wait_for_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to end, collect its output and return its exit status."""
        status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._drain()
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and return the exit status; kill the process if it outlives ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.wait_for_exit(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=5)

    def output(self) -> str:
        """Return everything the daemon has logged so far."""
        self._drain()
        return "\n".join(self.lines)

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)
