"""Retry policy: exponential backoff with jitter, only for errors `errors.is_retryable` accepts and only
before the first response of a call arrived (the callers enforce that; a half-streamed answer is never
silently restarted)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` extra attempts; delay before retry k (0-based) is
    min(max_backoff, initial_backoff * multiplier**k), reduced by up to `jitter` (a fraction) at random,
    so that many clients hit by the same outage do not come back in lockstep."""

    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, retry_index: int, *, rng: random.Random | None = None) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** retry_index)
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)
