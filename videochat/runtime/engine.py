"""Continuous (in-flight) batching: requests join and leave the running batch between decode steps.

`GenerationEngine` holds one running batch — a KV cache, an attention mask, the next position id and the
pending next-token logits per row — and three operations:

* `add(requests)`: one vision pass for the new requests, one left-padded prefill among themselves, then the new
  rows are merged into the running batch (the shorter side of the KV cache / mask is left-padded with zeros);
* `step()`: sample one token per row from its pending logits, emit the events, drop finished rows, run one
  decode forward for the survivors (their pending logits for the next step);
* `cancel(handle)`: the row leaves at once with a final 'cancelled' event.

A row's tokens do not depend on when it joined or on its batch-mates: its positions continue from its own
count (`cumsum(mask) - 1` at prefill, +1 per step) and the padding columns are masked out, so the only
difference to running alone is floating-point reduction order (docs/model.md, "The generation engine").

The engine is not thread-safe: drive it from one thread. After an exception other than `add`'s ValueError
(e.g. out of memory in a forward) the batch state is undefined; build a new engine.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from videochat.model import llm
from videochat.runtime.chat_format import TokenizedPrompt, build_prompt
from videochat.runtime.batch import eos_token_ids, left_pad, positions_from_mask, tokens_per_clip
from videochat.runtime.detokenize import IncrementalDetokenizer
from videochat.runtime.sampling import MIN_NEW_TOKENS, apply_repetition_penalty, make_generator, sample_token
from videochat.runtime.types import ChatRequest, FinishReason, TokenEvent
from videochat.runtime.visual_cache import VisualCache, VisualKey

# --------------------------------------------------------------------------------------------- per-request state

@dataclass(kw_only=True)
class _Slot:
    """Mutable state of one running request (private); its row in the batch tensors is its index in
    `GenerationEngine._slots`."""

    handle: int
    request: ChatRequest
    prompt: TokenizedPrompt
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    finish_reason: FinishReason | None = None

    @property
    def generated(self) -> list[int]:
        return self.detokenizer.ids

    def finish(self, reason: FinishReason) -> str:
        """Mark finished; returns the rest of the text (what the incremental decode held back)."""
        self.finish_reason = reason
        return self.detokenizer.finish()

    def event(self, token_id: int | None, text: str) -> TokenEvent:
        return TokenEvent(token_id=token_id, text=text, finished=self.finish_reason is not None,
                          finish_reason=self.finish_reason, prompt_tokens=self.prompt.length,
                          completion_tokens=len(self.generated))


def make_slots(model, requests: Sequence[ChatRequest], handles: Sequence[int]) -> list[_Slot]:
    """Tokenised prompts and sampling state; raises ValueError for a prompt that cannot be built."""
    per_clip = tokens_per_clip(model)
    return [_Slot(handle=h, request=r, generator=make_generator(r.params, model.device),
                  detokenizer=IncrementalDetokenizer(model.tokenizer),
                  prompt=build_prompt(model.tokenizer, media_type=r.media_type, num_clips=r.clips(per_clip),
                                      tokens_per_clip=per_clip, prompt=r.prompt, history=r.history, msg=r.msg,
                                      instruction=r.instruction))
            for h, r in zip(handles, requests)]


# --------------------------------------------------------------------------------------------- batch tensors

@dataclass(frozen=True, kw_only=True)
class _Batch:
    """The running batch's tensors; row r belongs to the r-th slot.

    cache: the LLM's KV cache (`videochat.llm`), each layer's keys/values [B, kv_heads, S, head_dim] (left-padded
           with zeros)
    mask: [B, S] long, 0 on padding columns
    next_position: [B] long, the position id of each row's next token (= its own token count)
    logits: [B, V] float32, the pending distribution of each row's next token
    """

    cache: object
    mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Zero columns on the left of a [B, S] mask up to `length`."""
    return torch.nn.functional.pad(mask, [length - mask.shape[1], 0])


def merge_batches(a: _Batch, b: _Batch) -> _Batch:
    """Rows of `a` then rows of `b`. The shorter side is left-padded with zeros (KV) and zero mask columns, so
    every row keeps its own tokens right-aligned; positions are per row and need no change. Reuses a.cache."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    return _Batch(cache=llm.merge_caches(a.cache, b.cache, length),
                  mask=torch.cat([_left_pad_mask(a.mask, length), _left_pad_mask(b.mask, length)]),
                  next_position=torch.cat([a.next_position, b.next_position]),
                  logits=torch.cat([a.logits, b.logits]))


def select_rows(batch: _Batch, rows: Sequence[int]) -> _Batch:
    """Keep `rows` (in that order), then trim the leading columns no kept row attends to: without the trim the
    key axis of a never-idle engine would grow without bound (it would keep the longest prompt ever seen)."""
    if list(rows) == list(range(batch.size)):
        return batch
    keep = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask[keep]
    first = int(mask.any(dim=0).int().argmax())   # first column some kept row attends to
    return _Batch(cache=llm.select_cache_rows(batch.cache, rows, first), mask=mask[:, first:],
                  next_position=batch.next_position[keep], logits=batch.logits[keep])


def forward_last_logits(model, inputs_embeds, attention_mask, position_ids, cache) -> torch.Tensor:
    """One LLM call over [B, L, H] (prefill) or [B, 1, H] (decode); returns last-position logits [B, V] float32."""
    return llm.forward_last_logits(model.llm, inputs_embeds, attention_mask, position_ids, cache)


def prefill(model, slots: Sequence[_Slot], visual: Sequence[torch.Tensor]) -> _Batch:
    """Text embeddings with each request's visual tokens [clips*96, H] merged in, left-padded among the new
    requests ([B, L_max, H] + mask [B, L_max], positions `cumsum(mask) - 1`), one LLM pass into a fresh cache."""
    from videochat.model.projection import merge_visual_tokens
    embeds = [merge_visual_tokens(llm.embed(model.llm, s.prompt.input_ids.to(model.device)),
                                  s.prompt.placeholder_mask.to(model.device), v)
              for s, v in zip(slots, visual)]
    inputs_embeds, mask = left_pad(embeds)
    positions = positions_from_mask(mask)
    cache = llm.new_cache(model.llm)
    logits = forward_last_logits(model, inputs_embeds, mask, positions, cache)
    return _Batch(cache=cache, mask=mask, next_position=positions[:, -1] + 1, logits=logits)


def decode(model, batch: _Batch, tokens: Sequence[int]) -> _Batch:
    """Feed one token per row ([B, 1, H] + a mask column + per-row positions); new pending logits."""
    token_embeds = llm.embed(model.llm, torch.tensor(list(tokens), device=model.device))  # [B, H]
    mask = torch.cat([batch.mask, batch.mask.new_ones(batch.size, 1)], dim=1)
    logits = forward_last_logits(model, token_embeds[:, None, :], mask, batch.next_position[:, None], batch.cache)
    return _Batch(cache=batch.cache, mask=mask, next_position=batch.next_position + 1, logits=logits)


def select_tokens(logits: torch.Tensor, slots: Sequence[_Slot], eos_ids: frozenset[int]) -> list[int]:
    """Next token per row of logits [B, V] (float32): EOS masked for rows with fewer than MIN_NEW_TOKENS
    (rows joined at different steps, so per row), repetition penalty, then argmax (greedy) or a draw from the
    request's own generator. Greedy rows share one argmax (one host sync per step)."""
    early = [row for row, slot in enumerate(slots) if len(slot.generated) < MIN_NEW_TOKENS]
    if early:
        rows = torch.tensor(early, device=logits.device)[:, None]
        eos = torch.tensor(sorted(eos_ids), device=logits.device)[None, :]
        logits = logits.index_put((rows, eos), torch.tensor(-float("inf"), device=logits.device))
    rows = [apply_repetition_penalty(logits[row], slot.generated, slot.request.params.repetition_penalty)
            for row, slot in enumerate(slots)]
    tokens = torch.stack(rows).argmax(dim=-1).tolist()
    for row, slot in enumerate(slots):
        if slot.request.params.do_sample:
            tokens[row] = sample_token(rows[row], slot.request.params, slot.generator)
    return tokens


def _advance(slot: _Slot, token: int, eos_ids: frozenset[int]) -> TokenEvent:
    """Record one generated token; finishes the slot on EOS ('stop') or at max_new_tokens ('length')."""
    text = slot.detokenizer.push(token)
    if token in eos_ids:
        text += slot.finish(FinishReason.STOP)
    elif len(slot.generated) >= slot.request.params.max_new_tokens:
        text += slot.finish(FinishReason.LENGTH)
    return slot.event(token, text)


# --------------------------------------------------------------------------------------------- the engine

class GenerationEngine:
    """Continuous (in-flight) batching: requests join and leave between decode steps.

    Invariant between calls: every active request has one row in the batch tensors, in `handles` order, with
    pending logits for its next token. Handles are unique for the engine's lifetime.
    """

    def __init__(self, model, *, visual_cache: VisualCache | None = None):
        llm.check_full_attention(model.llm)
        self.model = model
        self.visual_cache = visual_cache
        self._eos_ids = eos_token_ids(model)
        self._handles = itertools.count()
        self._slots: list[_Slot] = []
        self._batch: _Batch | None = None
        self.last_add_timings: tuple[float, float] | None = None   # (vision_s, prefill_s) of the last add
        self._encoded_last = False

    @property
    def num_active(self) -> int:
        return len(self._slots)

    @property
    def handles(self) -> tuple[int, ...]:
        """Handles of the active requests, in batch-row order."""
        return tuple(s.handle for s in self._slots)

    @property
    def kv_length(self) -> int:
        """Columns of the KV cache / mask (0 when idle): the longest active row's prompt + generated tokens,
        since rows leaving trim the columns nobody attends to."""
        return 0 if self._batch is None else int(self._batch.mask.shape[1])

    @property
    def pending_logits(self) -> torch.Tensor | None:
        """[num_active, V] float32 logits of each active request's next token (row order = `handles`)."""
        return None if self._batch is None else self._batch.logits

    def add(self, requests: Sequence[ChatRequest]) -> list[int]:
        """Encode media (one vision pass for all new requests, cache-aware) + prefill the new requests
        (left-padded among themselves) and merge them into the running batch. Returns one handle per request.
        Raises ValueError for a request that cannot run (bad media, bad prompt); then nothing of the call is
        added and the running batch is untouched."""
        if not requests:
            return []
        with torch.inference_mode():
            slots = make_slots(self.model, requests, [next(self._handles) for _ in requests])
            t0 = time.perf_counter()
            visual = self._visual_tokens(requests)
            t1 = time.perf_counter()
            new = prefill(self.model, slots, visual)
            # for the metrics; on CUDA the kernels run asynchronously, so the split between the two is rough
            self.last_add_timings = (t1 - t0 if self._encoded_last else 0.0, time.perf_counter() - t1)
            # nothing above touched the running batch: a ValueError leaves it intact
            self._batch = new if self._batch is None else merge_batches(self._batch, new)
        self._slots.extend(slots)
        return [s.handle for s in slots]

    def step(self) -> list[tuple[int, TokenEvent]]:
        """Sample one token for every active request, emit its event (the final one carries finished=True and
        finish_reason), drop finished requests from the batch, then run one decode forward for the survivors.
        Returns [] when idle."""
        if not self._slots:
            return []
        with torch.inference_mode():
            tokens = select_tokens(self._batch.logits, self._slots, self._eos_ids)
            events = [(slot.handle, _advance(slot, token, self._eos_ids)) for slot, token in zip(self._slots, tokens)]
            keep = [row for row, slot in enumerate(self._slots) if slot.finish_reason is None]
            self._keep(keep)
            if self._slots:
                self._batch = decode(self.model, self._batch, [tokens[row] for row in keep])
        return events

    def cancel(self, handle: int) -> TokenEvent:
        """Final 'cancelled' event (token_id None; text = whatever the incremental decode held back); the row
        leaves the batch. KeyError if `handle` is not active (finished, cancelled or unknown)."""
        rows = [row for row, slot in enumerate(self._slots) if slot.handle == handle]
        if not rows:
            raise KeyError(f"no active request with handle {handle}")
        slot = self._slots[rows[0]]
        text = slot.finish(FinishReason.CANCELLED)
        with torch.inference_mode():
            self._keep([row for row in range(len(self._slots)) if row != rows[0]])
        return slot.event(None, text)

    # ------------------------------------------------------------------------------------------ internals
    def _keep(self, rows: list[int]) -> None:
        """Only `rows` stay active (slots and batch tensors); an empty batch is dropped entirely."""
        self._slots = [self._slots[row] for row in rows]
        self._batch = select_rows(self._batch, rows) if rows else None

    def _visual_tokens(self, requests: Sequence[ChatRequest]) -> list[torch.Tensor]:
        """[clips*96, H] per request: cache hits as stored, all misses in ONE `encode_media` call (a media_key
        that repeats within the call is encoded once)."""
        cache = self.visual_cache
        keys = [None if r.visual_tokens is not None else VisualKey.of(r) for r in requests]
        # given tokens (a follow-up by media_key, looked up by the server) are used as they are
        out = [r.visual_tokens if r.visual_tokens is not None else cache.get(k) if cache is not None and k is not None
               else None for r, k in zip(requests, keys)]
        misses: dict[object, list[int]] = {}   # distinct key -> request indices; keyless requests never share
        for i, (key, tokens) in enumerate(zip(keys, out)):
            if tokens is None:
                misses.setdefault(key if key is not None else ("no-key", i), []).append(i)
        encoded = self._encode([requests[indices[0]] for indices in misses.values()]) if misses else []
        self._encoded_last = bool(misses)
        for indices, tokens in zip(misses.values(), encoded):
            for i in indices:
                out[i] = tokens
            if cache is not None and keys[indices[0]] is not None:
                cache.put(keys[indices[0]], tokens)
        return out

    def _encode(self, requests: Sequence[ChatRequest]) -> list[torch.Tensor]:
        """One vision pass (ViT + QFormer + project_up) for all `requests`: [clips*96, H] each."""
        model = self.model
        return model.encode_media([r.media.to(device=model.device, dtype=model.dtype) for r in requests],
                                  [r.media_type.value for r in requests], [r.instruction for r in requests])
