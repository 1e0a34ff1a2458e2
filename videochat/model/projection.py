"""QFormer -> LLM projection and the merge of visual tokens into the text embeddings (docs/model.md,
"Reference architecture").

`project_up` maps each of the 96 query outputs of a view to the LLM width. The prompt holds 96 placeholder
positions per view (id 0); the k-th block of 96 placeholders, in text order, receives view k (HD tiles
row-major, then the global view). `project_down` exists in the checkpoint but is training-only (not built).
"""
from __future__ import annotations

import torch
from torch import nn


class ProjectUp(nn.Linear):
    """`project_up`: Linear(QFormer width -> LLM width, bias). [..., Hq] -> [..., H_llm]."""

    def __init__(self, qformer_width: int, llm_width: int):
        super().__init__(qformer_width, llm_width, bias=True)


def merge_visual_tokens(text_embeds: torch.Tensor, placeholder_mask: torch.Tensor,
                        visual: torch.Tensor) -> torch.Tensor:
    """Scatter visual tokens into the placeholder positions of one prompt.

    text_embeds [L, H] (embeddings of the prompt ids, placeholders included), placeholder_mask [L] bool
    (True at the n*96 visual positions, in view order), visual [n*96, H] -> new tensor [L, H].
    Equivalent to the reference's `E[index] = E[index] * 0 + visual` (the `* 0` keeps nothing of the
    placeholder embedding).
    """
    if placeholder_mask.dtype != torch.bool or placeholder_mask.shape != text_embeds.shape[:1]:
        raise ValueError(f"placeholder_mask must be bool [{text_embeds.shape[0]}], got "
                         f"{placeholder_mask.dtype} {list(placeholder_mask.shape)}")
    n = int(placeholder_mask.sum())
    if n != visual.shape[0] or visual.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(f"{n} placeholder positions of width {text_embeds.shape[-1]} but visual tokens have shape "
                         f"{list(visual.shape)}")
    out = text_embeds.clone()
    out[placeholder_mask.to(text_embeds.device)] = visual.to(device=text_embeds.device, dtype=text_embeds.dtype)
    return out
