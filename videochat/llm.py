"""The only module that touches the language model's internals (transformers' `MistralForCausalLM`).

The engine and the model call these functions and nothing else of the library: build the LLM from our
`LLMConfig`, embed ids, make an empty KV cache, run one forward over `inputs_embeds` (explicit attention mask
and position ids) returning the last position's logits, and the cache surgery continuous batching needs
(left-pad + merge two batches, keep some rows and drop leading columns). `tests/test_llm_contract.py` pins what
these functions assume about the library, so an upgrade that changes it fails there by name.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig

# the sequence axis of a KV tensor [B, kv_heads, S, head_dim]
KV_SEQ_DIM = 2


def build_llm(config: LLMConfig) -> nn.Module:
    """transformers' `MistralForCausalLM` with SDPA attention (under `torch.device("meta")` when loading)."""
    from transformers import MistralForCausalLM
    return MistralForCausalLM(config.mistral_config("sdpa"))


def init_non_persistent_buffers(llm: nn.Module, device: torch.device) -> None:
    """The rotary `inv_freq` is not in checkpoints, so a meta-built model has none: rebuild it on `device`
    (transformers 5 dropped the rotary module's `device` argument, hence build-then-move)."""
    rotary = llm.model.rotary_emb
    llm.model.rotary_emb = type(rotary)(config=llm.config).to(device)


def embed(llm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[..., L] ids -> [..., L, H] embeddings."""
    return llm.get_input_embeddings()(input_ids)


def new_cache(llm: nn.Module):
    """An empty KV cache for one batch (filled by the first `forward_last_logits`)."""
    from transformers import DynamicCache
    return DynamicCache(config=llm.config)


def check_full_attention(llm: nn.Module) -> None:
    """Continuous batching merges left-padded caches; a sliding-window layer keeps only the last W columns per
    batch, which that would break."""
    if any(layer.is_sliding for layer in new_cache(llm).layers):
        raise NotImplementedError("sliding-window attention is not supported by the continuous-batching engine")


def additive_attention_mask(mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 padding mask -> [B, 1, q, S] additive mask (0 = attend, dtype's min = masked), causal over
    the last `query_len` positions, as transformers would build it.

    Why build it here: transformers 4.57 builds the mask of a padded batch with `vmap` on every call, which on
    CPU cost more than the whole decode step of the demo model (batch 16: ~4 ms of a ~10 ms step); broadcasting
    is ~free. A query row with no key at all (left padding during prefill) attends to every key so it stays
    finite: no real position reads a padded one, so real positions are unchanged."""
    length = mask.shape[1]
    keys = torch.arange(length, device=mask.device)
    queries = torch.arange(length - query_len, length, device=mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed,
                                                                                     torch.finfo(dtype).min)


def _cache_kwarg(llm: nn.Module) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def forward_last_logits(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, cache) -> torch.Tensor:
    """One call over [B, L, H] (prefill) or [B, 1, H] (decode) appending L columns to `cache`.

    attention_mask [B, S_past + L] (0 on padding), position_ids [B, L]; returns the last position's logits
    [B, V] float32. Without padding the 2D mask goes as is (transformers then takes its causal fast path)."""
    if not bool(attention_mask.all()):
        attention_mask = additive_attention_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
    out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=True, logits_to_keep=1, **{_cache_kwarg(llm): cache})
    return out.logits[:, -1, :].float()


def _left_pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis of [B, kv_heads, S, head_dim] up to `length`."""
    missing = length - x.shape[KV_SEQ_DIM]
    return x if missing == 0 else F.pad(x, [0, 0, missing, 0])


def merge_caches(a, b, length: int):
    """Rows of `a` then rows of `b`, each side left-padded with zero columns to `length` (rows stay
    right-aligned). Reuses and returns `a`."""
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_left_pad_seq(la.keys, length), _left_pad_seq(lb.keys, length)])
        la.values = torch.cat([_left_pad_seq(la.values, length), _left_pad_seq(lb.values, length)])
    return a


def select_cache_rows(cache, rows: Sequence[int], first: int):
    """Keep batch `rows` (in that order) and drop the `first` leading columns. Reuses and returns `cache`."""
    keep = torch.tensor(list(rows), dtype=torch.long, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys[keep, :, first:]
        layer.values = layer.values[keep, :, first:]
    return cache


def cache_layout(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [B, kv_heads, S, head_dim]: what the tests inspect."""
    return [(layer.keys, layer.values) for layer in cache.layers]
