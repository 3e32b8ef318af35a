"""Exponential backoff with jitter, shared by every reconnect loop.

Jitter matters on a line: when the broker or a camera switch restarts, every
station would otherwise retry in lock-step and hit it at the same instant.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays first, 2*first, 4*first ... up to ceiling, each drawn from [d/2, d]."""

    def __init__(self, first: float = 0.5, ceiling: float = 30.0, rng: random.Random | None = None):
        if first <= 0 or ceiling < first:
            raise ValueError(f"backoff needs 0 < first <= ceiling, got {first}, {ceiling}")
        self.first = first
        self.ceiling = ceiling
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt (grows with every failure)."""
        delay = min(self.ceiling, self.first * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return self._rng.uniform(delay / 2, delay)

    def reset(self):
        """After a success: the next failure starts again from `first`."""
        self.attempts = 0
