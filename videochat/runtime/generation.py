"""The fixed-batch API over the continuous-batching engine (`videochat.runtime.engine.GenerationEngine`, where
requests join and leave between decode steps). `generate_stream(model, requests)` adds all requests to one engine and
yields one `TokenEvent | None` per request per step; `generate(model, requests)` is the non-streaming
wrapper. Equivalence with the reference (batch size 1, HF `generate`; docs/model.md, quirks Q5, Q6, Q14, Q16):

* prompts are left-padded with an attention mask and position ids `cumsum(mask) - 1`, as HF `generate` does,
  so a request's tokens do not depend on its batch-mates (tested token for token);
* greedy is `argmax` of the float32 logits; EOS is masked at a request's first step (the `min_length=1`
  quirk of the transformers version the reference ran on, docs/model.md quirk Q6);
* sampling follows HF's processor order (repetition penalty over generated ids, temperature, top-k, top-p)
  with one `torch.Generator` per request, so a seeded request samples the same tokens in any batch;
* text is decoded like `batch_decode(skip_special_tokens=True)` with the slow tokenizer; the streamed deltas
  concatenate to exactly that text.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from videochat.runtime.chat_format import append_turn
from videochat.runtime.engine import GenerationEngine
from videochat.runtime.types import ChatRequest, ChatResult, FinishReason, TokenEvent


def first_step_logits(model, requests: Sequence[ChatRequest]) -> torch.Tensor:
    """Raw logits [B, V] (float32) of the first generated position, computed by the same batched prefill as
    generation (for parity checks against the reference and for scoring)."""
    engine = GenerationEngine(model)
    engine.add(requests)
    return engine.pending_logits


def generate_stream(model, requests: Sequence[ChatRequest],
                    should_stop: Callable[[int], bool] | None = None) -> Iterator[list[TokenEvent | None]]:
    """Generate for all requests together; yield, per step, one `TokenEvent | None` per request (None once the
    request has finished). `should_stop(i)` is asked before every step; True cancels request i.

    All requests join one `GenerationEngine` at once; finished requests leave the batch (their rows are dropped
    from the KV cache), so a long answer never pays for finished batch-mates.
    """
    engine = GenerationEngine(model)
    index = {handle: i for i, handle in enumerate(engine.add(requests))}
    while engine.num_active:
        events: list[TokenEvent | None] = [None] * len(requests)
        if should_stop is not None:
            for handle in engine.handles:
                if should_stop(index[handle]):
                    events[index[handle]] = engine.cancel(handle)
        for handle, event in engine.step():
            events[index[handle]] = event
        yield events


def generate(model, requests: Sequence[ChatRequest],
             should_stop: Callable[[int], bool] | None = None) -> list[ChatResult]:
    """Non-streaming wrapper of `generate_stream`: one `ChatResult` per request, in order."""
    token_ids: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    reasons: list[FinishReason | None] = [None] * len(requests)
    prompt_tokens = [0] * len(requests)
    for events in generate_stream(model, requests, should_stop):
        for i, event in enumerate(events):
            if event is None:
                continue
            if event.token_id is not None:
                token_ids[i].append(event.token_id)
            texts[i] += event.text
            prompt_tokens[i] = event.prompt_tokens
            if event.finished:
                reasons[i] = event.finish_reason
    return [ChatResult(text=texts[i], token_ids=token_ids[i], prompt_tokens=prompt_tokens[i],
                       completion_tokens=len(token_ids[i]),
                       finish_reason=reasons[i], history=append_turn(r.history, r.prompt, texts[i]))
            for i, r in enumerate(requests)]
