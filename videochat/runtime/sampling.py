"""Token selection as the reference's HF `generate` does it: greedy argmax, or repetition penalty over the
generated ids, temperature, top-k, top-p and one seeded `torch.Generator` per request."""
from __future__ import annotations

import random
from typing import Sequence

import torch

from videochat.runtime.types import GenerationParams

# `generate_caption` hard-codes min_length=1; transformers 4.38 (the reference) applies it to the new tokens,
# i.e. EOS cannot be the first generated token (docs/model.md, quirk Q6). transformers >= 4.40 would not mask.
MIN_NEW_TOKENS = 1
_SEED_BITS = 63


def apply_repetition_penalty(logits: torch.Tensor, generated: Sequence[int], penalty: float) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor` on one row [V]; the reference calls `generate(inputs_embeds=...)`,
    so only the generated ids count (the prompt is not in `input_ids`)."""
    if penalty == 1.0 or not generated:
        return logits
    ids = torch.tensor(sorted(set(generated)), device=logits.device)
    scores = logits.gather(0, ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, ids, scores)


def filter_top_k_top_p(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """HF `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1) on one row [V]."""
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[-1] = False  # keep at least the best token
        remove = remove_sorted.scatter(0, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, -float("inf"))
    return logits


def sample_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """Temperature, top-k, top-p, then one multinomial draw from `generator`; `logits` is one float32 row [V]."""
    logits = filter_top_k_top_p(logits / params.temperature, top_k=params.top_k, top_p=params.top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def make_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if not params.do_sample:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(_SEED_BITS)
    return torch.Generator(device=device).manual_seed(seed)
