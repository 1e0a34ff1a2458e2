"""An LRU cache of visual tokens (ViT + QFormer + project_up output), bounded by bytes.

A follow-up question about the same video re-sends the whole media block (docs/model.md, quirk Q3), so
without a cache every turn pays the full vision pass again. The key is `(media_key, media_type, instruction)`:
`media_key` is a content hash of the input bytes + preprocessing options that the server computes; the
instruction is part of the key because it also conditions the QFormer. A request without a `media_key` is never cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from videochat.runtime.byte_lru import ByteLRU


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


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class VisualCache(ByteLRU[VisualKey, torch.Tensor]):
    """Values are `[clips*96, H]` tensors, stored as their own copy so a view of a larger batch output does not
    keep the whole batch alive."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, tensor_bytes)

    def put(self, key: VisualKey, tokens: torch.Tensor) -> None:
        if tensor_bytes(tokens) <= self.max_bytes:
            super().put(key, tokens.detach().clone())
