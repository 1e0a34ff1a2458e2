"""A thread-safe LRU cache bounded by bytes, with hit/miss counters.

One implementation for the server's two content-addressed caches: preprocessed media (serving/preprocess.py)
and visual tokens (visual_cache.py). No torch or numpy here: the caller says how big a value is.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


class ByteLRU(Generic[K, V]):
    """LRU by total `sizeof(value)`; `max_bytes == 0` stores nothing, and a value larger than the budget is
    not stored (it would evict everything and still not fit)."""

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._sizeof = sizeof
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The stored value (shared: do not modify it), marked most recently used; None on a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> None:
        size = self._sizeof(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= self._sizeof(old)
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= self._sizeof(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: K) -> bool:   # no LRU touch, no counters
        with self._lock:
            return key in self._entries

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self.hits, misses=self.misses, entries=len(self._entries), bytes=self.bytes,
                              max_bytes=self.max_bytes)
