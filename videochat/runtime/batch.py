"""Helpers for a padded batch of prompts: left padding, position ids, and the model facts the engine reads."""
from __future__ import annotations

from typing import Sequence

import torch


def tokens_per_clip(model) -> int:
    """Visual tokens per clip (view) = num_query_token + extra_num_query_token of the bridge config."""
    return int(model.config.num_visual_tokens_per_clip)


def eos_token_ids(model) -> frozenset[int]:
    """EOS id(s) from the LLM config (the reference stops on the LM generation config's EOS), else the
    tokenizer's."""
    eos = getattr(model.llm.config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos)


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, H] per request -> inputs_embeds [B, L_max, H] (zeros on the left) and attention_mask [B, L_max]."""
    longest = max(e.shape[0] for e in embeds)
    batch = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for row, e in enumerate(embeds):
        batch[row, longest - e.shape[0]:] = e
        mask[row, longest - e.shape[0]:] = 1
    return batch, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position ids [B, L] = cumsum(mask) - 1 (as HF generate), 1 at padding (never attended)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
