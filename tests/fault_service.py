"""
A service whose methods misbehave on purpose, for the hostile-input and
load tests: they raise, hang, return values JSON cannot encode, block a
thread, or answer late. The daemon loads it with ``--methods fault_service``
when ``tests/`` is on ``PYTHONPATH``.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from netrpc.methods import blocking

__all__ = ["blob", "block", "explode", "hang", "late_blob", "late_echo", "unencodable"]

# Bounds on what a test may ask for, so a mistaken test cannot hold the
# daemon or its threads for long.
MAX_DELAY_SECONDS = 60.0
MAX_BLOB_BYTES = 8 * 1024 * 1024


def explode(message: str) -> None:
    """Raise an exception that is not an RPC error, as a buggy method would."""
    raise RuntimeError(message)


def hang() -> Deferred[None]:
    """Return a Deferred that never fires unless the server cancels it."""
    return Deferred()


def unencodable() -> dict[str, Any]:
    """Return a value that JSON cannot represent."""
    return {"set": {1, 2, 3}}


@blocking
def block(seconds: float) -> float:
    """Block a thread of the server's pool for ``seconds``, then return it."""
    time.sleep(_checked_delay(seconds))
    return seconds


def late_echo(seconds: float, value: Any) -> Deferred[Any]:
    """Return ``value`` after ``seconds``, without blocking other calls."""
    return deferLater(reactor, _checked_delay(seconds), lambda: value)  # type: ignore[arg-type]


def blob(size: int) -> str:
    """Return a string of ``size`` bytes at once."""
    return "x" * _checked_size(size)


def late_blob(seconds: float, size: int) -> Deferred[str]:
    """Return a string of ``size`` bytes after ``seconds``."""
    size = _checked_size(size)
    return deferLater(reactor, _checked_delay(seconds), lambda: "x" * size)  # type: ignore[arg-type]


def _checked_delay(seconds: float) -> float:
    if not 0 <= seconds <= MAX_DELAY_SECONDS:
        raise ValueError(f"delay {seconds!r} is outside 0 to {MAX_DELAY_SECONDS:g} seconds")
    return seconds


def _checked_size(size: int) -> int:
    if not 0 <= size <= MAX_BLOB_BYTES:
        raise ValueError(f"size {size!r} is outside 0 to {MAX_BLOB_BYTES} bytes")
    return size
