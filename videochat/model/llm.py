"""The language model: Mistral-7B's decoder written out in plain PyTorch, and everything the engine does with it.

Why not transformers' `MistralForCausalLM`: the engine needs the KV cache as tensors it can left-pad, merge,
select rows of and trim, its own padded 4D mask, and a rotary module it can rebuild after meta-device loading —
all transformers internals that changed between 4.57 and 5.x (and keep moving: cache layers, the
`past_key_values` -> `cache` rename, the rotary constructor). Written here they are ours: one forward, one cache
layout, and a decode step faster than transformers' (docs/model.md, "The language model").

Module names are transformers' (`model.layers.N.self_attn.q_proj`, `model.norm`, `lm_head`, ...), so the
checkpoint's `lm.base_model.model.*` keys load strictly into it unchanged, and the tests can load the same
weights into transformers' `MistralForCausalLM` as the reference (`tests/test_llm_contract.py`).

The engine uses only the functions at the bottom: `build_llm`, `init_non_persistent_buffers`, `embed`,
`new_cache`, `check_full_attention`, `forward_last_logits`, `merge_caches`, `select_cache_rows`, `cache_layout`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from videochat.model.config import LLMConfig

# the sequence axis of a KV tensor [B, kv_heads, S, head_dim]
KV_SEQ_DIM = 2
# the cache grows by this many columns at a time, so a decode step writes in place instead of concatenating
CACHE_CHUNK = 256


# --------------------------------------------------------------------------------------------- the KV cache

@dataclass(eq=False)
class KVCache:
    """Per layer keys and values [B, kv_heads, capacity, head_dim]; columns [0, length) hold the tokens (rows
    left-padded with zeros), the rest is room to append into."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[KV_SEQ_DIM]) if self.keys else 0


def _round_up(columns: int) -> int:
    """The capacity for `columns` used columns: the next multiple of CACHE_CHUNK above it (room to append)."""
    return (columns // CACHE_CHUNK + 1) * CACHE_CHUNK


def _with_capacity(x: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A [B, kv_heads, capacity, head_dim] buffer holding x's first `used` columns (the rest uninitialised:
    only columns below `length` are ever read)."""
    out = x.new_empty(x.shape[0], x.shape[1], capacity, x.shape[3])
    out[:, :, :used] = x[:, :, :used]
    return out


def _reserve(cache: KVCache, num_layers: int, shape: tuple[int, int, int], columns: int,
             like: torch.Tensor) -> None:
    """Make room for `columns` columns; shape = (B, kv_heads, head_dim), `like` gives dtype and device."""
    if not cache.keys:
        b, heads, dim = shape
        cache.keys = [like.new_empty(b, heads, _round_up(columns), dim) for _ in range(num_layers)]
        cache.values = [like.new_empty(b, heads, _round_up(columns), dim) for _ in range(num_layers)]
    elif columns > cache.capacity:
        capacity = _round_up(columns)
        cache.keys = [_with_capacity(k, cache.length, capacity) for k in cache.keys]
        cache.values = [_with_capacity(v, cache.length, capacity) for v in cache.values]


# --------------------------------------------------------------------------------------------- the decoder

class RMSNorm(nn.Module):
    """Normalised in float32, scaled in the input dtype (as Mistral/transformers)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE; `inv_freq` is a non-persistent buffer (never in checkpoints), rebuilt after meta loading."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, 1, L, head_dim] (computed in float32, cast to `dtype`)."""
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass(frozen=True)
class AttentionMask:
    """What SDPA gets: an additive mask [B, 1, L, S] (0 = attend, dtype's min = masked), or none with/without
    causality."""

    mask: torch.Tensor | None = None
    is_causal: bool = False


def attention_mask(padding_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> AttentionMask:
    """[B, S] 0/1 (0 = padding column) -> the mask of the last `query_len` positions, causal.

    Unpadded batches take SDPA's fast paths (no mask for one query; `is_causal` for a prefill without past).
    Built once per forward as an additive mask in the activations' dtype (SDPA would convert a boolean one in
    every layer). A query row with no key at all (a left-padding position during prefill) attends to every key
    so it stays finite: no real position reads a padded one, so real positions are unchanged."""
    length = padding_mask.shape[1]
    if bool(padding_mask.all()):
        if query_len == 1:
            return AttentionMask()
        if query_len == length:
            return AttentionMask(is_causal=True)
    keys = torch.arange(length, device=padding_mask.device)
    queries = torch.arange(length - query_len, length, device=padding_mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & padding_mask.bool()[:, None, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=padding_mask.device)
    return AttentionMask(mask=additive.masked_fill_(~allowed, torch.finfo(dtype).min))


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * groups, S, D] (each kv head serves `groups` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, groups: int) -> torch.Tensor:
    """GQA attention; q [B, H, L, D], k/v [B, kv_heads, S, D] -> [B, H, L, D].

    One query (decode): the `groups` query heads of a kv head become `groups` query rows of it, so the
    cache is read as it is (no repeat); the mask [B, 1, 1, S] is shared by all rows."""
    b, heads, length, dim = q.shape
    if length == 1 and groups > 1:
        packed = q.reshape(b, heads // groups, groups, dim)
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask.mask)
        return out.reshape(b, heads, 1, dim)
    if mask.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.is_causal, enable_gqa=groups > 1)
    return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask.mask)


class Attention(nn.Module):
    def __init__(self, config: LLMConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:   # [B, L, heads*D] -> [B, heads, L, D]
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: KVCache) -> torch.Tensor:
        cos, sin = rotary
        q = apply_rotary(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        start, end = cache.length, cache.length + x.shape[1]
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        out = attend(q, keys[:, :, :end], values[:, :, :end], mask, self.num_heads // self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralModel(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim, config.rope_theta)


class MistralForCausalLM(nn.Module):
    """Decoder + LM head; `forward` returns the last position's logits only (all generation needs)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.model = MistralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """inputs_embeds [B, L, H], padding_mask [B, cache.length + L], position_ids [B, L] -> logits [B, V] of
        the last position, float32; appends L columns to `cache`."""
        batch, length = inputs_embeds.shape[:2]
        if padding_mask.shape[1] != cache.length + length:
            raise RuntimeError(f"padding mask has {padding_mask.shape[1]} columns, expected the cache's "
                               f"{cache.length} + {length} new")
        attention = self.model.layers[0].self_attn
        _reserve(cache, len(self.model.layers), (batch, attention.num_kv_heads, attention.head_dim),
                 cache.length + length, inputs_embeds)
        rotary = self.model.rotary_emb(position_ids, inputs_embeds.dtype)
        mask = attention_mask(padding_mask, length, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, rotary, mask, cache)
        cache.length += length
        return self.lm_head(self.model.norm(x[:, -1:]))[:, -1].float()


def _check_supported(config: LLMConfig) -> None:
    """Refuse what this decoder does not implement rather than compute something else."""
    if config.hidden_act != "silu":
        raise NotImplementedError(f"llm hidden_act {config.hidden_act!r}: only 'silu' (Mistral) is implemented")
    if config.tie_word_embeddings:
        raise NotImplementedError("llm tie_word_embeddings=True is not implemented (Mistral-7B does not tie)")


# --------------------------------------------------------------------------------------------- the engine's API

def build_llm(config: LLMConfig) -> MistralForCausalLM:
    """The decoder for `config` (build it under `torch.device("meta")` to load a checkpoint into it)."""
    return MistralForCausalLM(config)


def init_non_persistent_buffers(llm: MistralForCausalLM, device: torch.device) -> None:
    """The rotary `inv_freq` is not in checkpoints, so a meta-built model has none: compute it on `device`."""
    rotary = llm.model.rotary_emb
    rotary.inv_freq = rotary.compute_inv_freq(device)


def embed(llm: MistralForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """[..., L] ids -> [..., L, H] embeddings."""
    return llm.model.embed_tokens(input_ids)


def new_cache(llm: MistralForCausalLM) -> KVCache:
    """An empty KV cache for one batch (sized by the first `forward_last_logits`)."""
    return KVCache()


def check_full_attention(llm: MistralForCausalLM) -> None:
    """Continuous batching merges left-padded caches; a sliding-window layer keeps only the last W columns per
    batch, which that would break (and this decoder implements no sliding window)."""
    if llm.config.sliding_window is not None:
        raise NotImplementedError("sliding-window attention is not supported by the continuous-batching engine")


def forward_last_logits(llm: MistralForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One call over [B, L, H] (prefill) or [B, 1, H] (decode) appending L columns to `cache`.

    attention_mask [B, S_past + L] (0 on padding), position_ids [B, L]; returns the last position's logits
    [B, V] float32."""
    return llm(inputs_embeds, attention_mask, position_ids, cache)


def _place(parts: Sequence[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """Stack the used columns of each (buffer, used) right-aligned at `length` columns, zeros on the left
    (padding keys/values must be finite: masked scores are dropped, but 0 * NaN would not be)."""
    first = parts[0][0]
    rows = sum(int(x.shape[0]) for x, _ in parts)
    out = first.new_zeros(rows, first.shape[1], _round_up(length), first.shape[3])
    row = 0
    for x, used in parts:
        out[row:row + x.shape[0], :, length - used:length] = x[:, :, :used]
        row += x.shape[0]
    return out


def merge_caches(a: KVCache, b: KVCache, length: int) -> KVCache:
    """Rows of `a` then rows of `b`, each side left-padded with zero columns to `length` (rows stay
    right-aligned)."""
    return KVCache(keys=[_place([(ka, a.length), (kb, b.length)], length) for ka, kb in zip(a.keys, b.keys)],
                   values=[_place([(va, a.length), (vb, b.length)], length) for va, vb in zip(a.values, b.values)],
                   length=length)


def select_cache_rows(cache: KVCache, rows: Sequence[int], first: int) -> KVCache:
    """Keep batch `rows` (in that order) and drop the `first` leading columns."""
    keep = torch.tensor(list(rows), dtype=torch.long, device=cache.keys[0].device)
    used = cache.length - first

    def take(x: torch.Tensor) -> torch.Tensor:
        return _with_capacity(x[:, :, first:cache.length].index_select(0, keep), used, _round_up(used))

    return KVCache(keys=[take(k) for k in cache.keys], values=[take(v) for v in cache.values], length=used)


def cache_layout(cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [B, kv_heads, S, head_dim] (S = the columns in use)."""
    return [(k[:, :, :cache.length], v[:, :, :cache.length]) for k, v in zip(cache.keys, cache.values)]
