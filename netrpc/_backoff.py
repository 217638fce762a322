"""
Reconnect delays: exponential backoff with random jitter, capped.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """
    A policy for the delay before the next reconnect attempt, in seconds.

    Before jitter, the delay after ``failures`` consecutive failed attempts
    is ``initial * multiplier ** failures``, capped at ``maximum``. Jitter
    then takes up to the fraction ``jitter`` off that delay, so that many
    clients that lost the same server do not come back in lockstep.
    ``random`` returns a float in [0, 1); tests pass a fixed one.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.5
    random: Callable[[], float] = field(default=_random.random, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"backoff initial delay {self.initial!r} must be positive and at most "
                f"the maximum {self.maximum!r}"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier {self.multiplier!r} must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter {self.jitter!r} must be between 0 and 1")

    def delay(self, failures: int) -> float:
        """Return the delay in seconds before the attempt that follows ``failures`` failures."""
        try:
            base = min(self.maximum, self.initial * self.multiplier**failures)
        except OverflowError:
            # A server that stays down for days must not crash the client.
            base = self.maximum
        return base * (1 - self.jitter * self.random())
