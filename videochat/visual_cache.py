"""An LRU cache of visual tokens (ViT + QFormer + project_up output), bounded by bytes.

A follow-up question about the same video re-sends the whole media block (quirk Q3), so without a cache every
turn pays the full vision pass again. The key is `(media_key, media_type, instruction)`: `media_key` is a
content hash of the input bytes + preprocessing options that the server computes; the instruction is part of
the key because it also conditions the QFormer. A request without a `media_key` is never cached.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualKey:
    media_key: str
    media_type: str
    instruction: str | None

    @classmethod
    def of(cls, request) -> "VisualKey | None":
        """The cache key of a ChatRequest, or None when it has no media_key (never cached)."""
        if request.media_key is None:
            return None
        return cls(request.media_key, str(request.media_type.value), request.instruction or None)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class VisualCache:
    """LRU by bytes, thread-safe. Values are `[clips*96, H]` tensors (stored as their own copy, so a view of a
    larger batch output does not keep the whole batch alive). An entry larger than `max_bytes` is not stored."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[VisualKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: VisualKey) -> torch.Tensor | None:
        """The stored tensor (do not modify it) and mark it most recently used; None on a miss."""
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return tokens

    def put(self, key: VisualKey, tokens: torch.Tensor) -> None:
        """Store a copy of `tokens`, evicting least recently used entries until the total fits."""
        size = tensor_bytes(tokens)
        if size > self.max_bytes:
            return
        copy = tokens.detach().clone()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            self._entries[key] = copy
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: VisualKey) -> bool:   # no LRU touch, no counters
        with self._lock:
            return key in self._entries

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, entries=len(self._entries), bytes=self._bytes,
                              max_bytes=self.max_bytes)
