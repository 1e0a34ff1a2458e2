"""What the engine assumes about the language model (`videochat.llm`), each assertion naming the assumption:

* it is Mistral as transformers defines it: same module names (the checkpoint's keys load into both) and the
  same logits as transformers' `MistralForCausalLM` with the same weights, for a left-padded prefill given as a
  2D mask and two decode steps (sdpa and eager), relative to the logits' magnitude;
* cache layout: per layer keys/values [B, kv_heads, S, head_dim], S growing by the tokens fed; decode writes
  in place while there is room (no per-step copy of the cache);
* mask handling: padding columns are never read (garbage in them changes nothing), a left-padded row equals the
  same row alone;
* position ids: taken per row from `position_ids`, not from the cache length;
* cache surgery: merge keeps every row right-aligned with zero padding on the left; select keeps rows in order
  and trims leading columns; the rotary `inv_freq` is no checkpoint key and is rebuilt after meta loading.

An upgrade of transformers that changes Mistral's math fails the first group; a change to `videochat.llm` that
breaks the engine's assumptions fails by name here before it shows up as a flipped golden token.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import replace

import pytest
import torch

from support.paths import TINY
from videochat.model import llm
from videochat.model.config import VideoChatConfig
from videochat.runtime.batch import left_pad, positions_from_mask

FIXTURE = TINY
RAW_CONFIG = json.loads((FIXTURE / "config.json").read_text())
CONFIG = VideoChatConfig.from_dict(RAW_CONFIG).llm
LM_HEAD_GAIN = 60.0   # as test_generation: clear-cut logits, so a wrong mask/position moves them visibly
# float32 reduction-order noise relative to the largest logit (observed <= 6e-7)
REL_NOISE = 1e-5


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = REL_NOISE) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=rel * scale, msg=lambda m: f"{what}\n{m}")


def build(seed: int = 0) -> llm.MistralForCausalLM:
    torch.manual_seed(seed)
    model = llm.build_llm(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 1.0)
        model.lm_head.weight.mul_(LM_HEAD_GAIN)
    return model


@pytest.fixture(scope="module")
def model() -> llm.MistralForCausalLM:
    return build()


def embeddings(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CONFIG.hidden_size, generator=g) for n in lengths]


def run(model, rows: list[torch.Tensor], steps: list[torch.Tensor]) -> tuple[list[torch.Tensor], llm.KVCache]:
    """Prefill the left-padded rows, then one decode step per entry of `steps` ([B, H] each): the logits of
    every call and the cache."""
    x, mask = left_pad(rows)
    positions = positions_from_mask(mask)
    cache = llm.new_cache(model)
    with torch.inference_mode():
        out = [llm.forward_last_logits(model, x, mask, positions, cache)]
        nxt = positions[:, -1:] + 1
        for step in steps:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out.append(llm.forward_last_logits(model, step[:, None], mask, nxt, cache))
            nxt = nxt + 1
    return out, cache


# --------------------------------------------------------------------------------------------- it is Mistral

def transformers_twin(model: llm.MistralForCausalLM, attn: str):
    from transformers import MistralForCausalLM
    twin = MistralForCausalLM(CONFIG.mistral_config(attn)).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected, \
        f"module names = transformers' MistralForCausalLM's (the checkpoint key table relies on it): " \
        f"missing {missing}, unexpected {unexpected}"
    return twin


def test_state_dict_names_and_shapes_are_transformers(model):
    twin = transformers_twin(model, "sdpa")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert ours == theirs, "same state_dict keys and shapes as transformers' MistralForCausalLM"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_transformers(model, attn):
    """A left-padded batch (3 rows, 2 padded) given to transformers as a 2D mask with positions cumsum-1, then two
    decode steps with the cache: the same logits."""
    from transformers import DynamicCache
    twin = transformers_twin(model, attn)
    rows = embeddings([4, 7, 6])
    steps = [torch.randn(3, CONFIG.hidden_size, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    ours, _ = run(model, rows, steps)
    x, mask = left_pad(rows)
    positions = positions_from_mask(mask)
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40)
    cache = {("cache" if "cache" in inspect.signature(twin.forward).parameters else "past_key_values"):
             DynamicCache(config=twin.config)}
    with torch.inference_mode():
        theirs = [twin(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True,
                       **cache).logits[:, -1].float()]
        for i, step in enumerate(steps):
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            theirs.append(twin(inputs_embeds=step[:, None], attention_mask=mask, position_ids=positions[:, -1:] + 1 + i,
                               use_cache=True, **cache).logits[:, -1].float())
    for call, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_rel(a, b, f"call {call}: our Mistral == transformers' MistralForCausalLM ({attn})")


# --------------------------------------------------------------------------------------------- cache layout

def test_cache_layout_per_layer(model):
    _, cache = run(model, embeddings([5, 3]), [torch.randn(2, CONFIG.hidden_size)])
    layout = llm.cache_layout(cache)
    head_dim = CONFIG.head_dim or CONFIG.hidden_size // CONFIG.num_attention_heads
    assert len(layout) == CONFIG.num_hidden_layers, "one (keys, values) per decoder layer"
    for keys, values in layout:
        assert keys.shape == values.shape == (2, CONFIG.num_key_value_heads, 5 + 1, head_dim), \
            "keys/values are [B, kv_heads, S, head_dim] with S = longest prompt + decoded tokens"
    assert llm.KV_SEQ_DIM == 2, "the sequence axis of a KV tensor is 2"


def test_decode_writes_in_place(model):
    x, mask = left_pad(embeddings([6]))
    cache = llm.new_cache(model)
    with torch.inference_mode():
        llm.forward_last_logits(model, x, mask, positions_from_mask(mask), cache)
        before = [k.data_ptr() for k in cache.keys]
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        llm.forward_last_logits(model, torch.randn(1, 1, CONFIG.hidden_size), mask, torch.tensor([[6]]), cache)
    assert [k.data_ptr() for k in cache.keys] == before, "a decode step appends into the cache's spare room"
    assert cache.capacity > cache.length, "the cache keeps room for the next step"


# --------------------------------------------------------------------------------------------- mask and positions

def test_padding_columns_are_never_read(model):
    rows = embeddings([3, 8])
    step = torch.randn(2, CONFIG.hidden_size)
    (_, clean), cache = run(model, rows, [step])
    _, cache2 = run(model, rows, [])
    mask = torch.cat([left_pad(rows)[1], torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        for k, v in zip(cache2.keys, cache2.values):   # row 0 has 5 padding columns
            k[0, :, :5] = 1e4
            v[0, :, :5] = -1e4
        dirty = llm.forward_last_logits(model, step[:, None], mask, torch.tensor([[3], [8]]), cache2)
    assert_close_rel(dirty, clean, "masked (padding) KV columns do not influence the logits")


def test_left_padded_row_equals_row_alone(model):
    rows = embeddings([4, 9])
    steps = [torch.randn(2, CONFIG.hidden_size, generator=torch.Generator().manual_seed(7))]
    batched, _ = run(model, rows, steps)
    alone, _ = run(model, rows[:1], [steps[0][:1]])
    for call, (a, b) in enumerate(zip(batched, alone)):
        assert_close_rel(a[0], b[0], f"call {call}: a left-padded row == that row alone (mask + positions)")


def test_positions_come_from_position_ids(model):
    """RoPE only sees relative offsets, so: the same decode step after the same cache, once at the next
    position and once 3 further on."""
    x, mask = left_pad(embeddings([5]))
    step, mask2 = torch.randn(1, 1, CONFIG.hidden_size), torch.ones(1, 6, dtype=torch.long)
    logits = []
    with torch.inference_mode():
        for position in (5, 8):
            cache = llm.new_cache(model)
            llm.forward_last_logits(model, x, mask, positions_from_mask(mask), cache)
            logits.append(llm.forward_last_logits(model, step, mask2, torch.tensor([[position]]), cache))
    assert not torch.allclose(*logits, rtol=0, atol=1e-3 * float(logits[0].abs().max())), \
        "position ids are used as given (rotary), not derived from the cache length"


# --------------------------------------------------------------------------------------------- cache surgery

def test_merge_keeps_rows_right_aligned_with_zero_padding(model):
    _, a = run(model, embeddings([3]), [])
    _, b = run(model, embeddings([7, 5], seed=2), [])
    merged = llm.merge_caches(a, b, 7)
    for (ka, _), (kb, _), (km, vm) in zip(llm.cache_layout(a), llm.cache_layout(b), llm.cache_layout(merged)):
        assert km.shape[0] == 3 and km.shape[2] == 7, "merge: rows of a then b, S = the longer side"
        assert torch.equal(km[0, :, 4:], ka[0]) and torch.equal(km[1:], kb), "merge keeps each row right-aligned"
        assert not km[0, :, :4].any() and not vm[0, :, :4].any(), "merge pads the shorter side with zeros"


def test_select_keeps_rows_in_order_and_trims(model):
    _, cache = run(model, embeddings([6, 4, 5]), [])
    full = [k.clone() for k, _ in llm.cache_layout(cache)]
    kept = llm.select_cache_rows(cache, [2, 1], first=1)
    for k_full, (k, _) in zip(full, llm.cache_layout(kept)):
        assert torch.equal(k, k_full[[2, 1], :, 1:]), "select: rows in the given order, leading columns dropped"


def test_rotary_is_rebuilt_after_meta_loading():
    with torch.device("meta"):
        meta = llm.build_llm(CONFIG)
    assert not any("inv_freq" in k for k in meta.state_dict()), "rotary inv_freq is not a checkpoint key"
    llm.init_non_persistent_buffers(meta, torch.device("cpu"))
    rotary = meta.model.rotary_emb
    head_dim = CONFIG.hidden_size // CONFIG.num_attention_heads
    want = 1.0 / CONFIG.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert not rotary.inv_freq.is_meta and torch.equal(rotary.inv_freq, want), "inv_freq rebuilt on the device"


def test_sliding_window_is_refused():
    with pytest.raises(NotImplementedError, match="sliding-window"):
        llm.check_full_attention(llm.build_llm(replace(CONFIG, sliding_window=16)))
