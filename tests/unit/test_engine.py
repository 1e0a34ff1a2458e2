"""Continuous batching (`videochat.runtime.engine.GenerationEngine`) and the visual-token cache (`VisualCache`).

* requests joining at different steps (two at once, one while another is mid-answer, one after batch-mates
  finished, one into an idle engine), and cancellations, produce exactly the tokens of each request run alone:
  greedy and seeded sampling on the fake model of test_generation.py, greedy on the real tiny fixture (golden
  turns joining at staggered steps == golden.json `generated_ids` / `response`);
* rows leaving trim the KV columns nobody attends to; a bad request in `add` raises ValueError and leaves the
  running batch intact;
* the cache: a hit gives identical tokens and skips the vision pass, repeated keys in one call are encoded once,
  eviction by bytes (LRU), requests without `media_key` are never cached.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import pytest
import torch

from support.numerics import assert_close_scaled
from support.fakes import FRAME, MIXED, FakeModel, media, request
from videochat.runtime.engine import GenerationEngine
from videochat.runtime.detokenize import DECODE_KWARGS
from videochat.runtime.generation import generate
from videochat.runtime.types import ChatRequest, FinishReason, GenerationParams, TokenEvent
from videochat.runtime.visual_cache import VisualCache, VisualKey

MAX_STEPS = 200
# Joined vs alone differ only by reduction order: observed <= 6e-6 absolute on logits of magnitude ~5
# (rel ~1e-6); a wrong position id or an attended padding column moves them by ~0.1 (rel ~2e-2).
LOGITS_REL = 2e-5


class StrictFakeModel(FakeModel):
    """Rejects views of the wrong size like the real ViT does (ValueError), and records each encode call."""

    def __init__(self):
        super().__init__()
        self.encoded_batches: list[int] = []

    def encode_media(self, media, media_types, instructions):
        for m in media:
            if m.shape[-2:] != (FRAME, FRAME):
                raise ValueError(f"only {FRAME}x{FRAME} views are supported, got {tuple(m.shape[-2:])}")
        self.encoded_batches.append(len(media))
        return super().encode_media(media, media_types, instructions)


@pytest.fixture(scope="module")
def model():
    return StrictFakeModel()


@dataclass
class Run:
    """What one request got from the engine: its events and the pending logits [V] it was sampled from."""
    events: list[TokenEvent] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return token_ids(self.events)


def run_schedule(engine: GenerationEngine, joins: dict[int, list[ChatRequest]],
                 cancels: dict[int, list[int]] | None = None) -> list[Run]:
    """Drive the engine: before step s, add `joins[s]` (one add call) and cancel the requests numbered
    `cancels[s]` (numbers = join order). Returns one Run per request, in join order."""
    cancels = cancels or {}
    handles: list[int] = []
    runs: dict[int, Run] = {}
    for step in range(MAX_STEPS):
        for handle in engine.add(joins.get(step, [])):
            handles.append(handle)
            runs[handle] = Run()
        for number in cancels.get(step, []):
            runs[handles[number]].events.append(engine.cancel(handles[number]))
        for row, handle in enumerate(engine.handles):
            runs[handle].logits.append(engine.pending_logits[row].clone())
        for handle, event in engine.step():
            runs[handle].events.append(event)
        if step >= max(joins) and not engine.num_active:
            break
    assert not engine.num_active
    return [runs[h] for h in handles]


def alone(model, request: ChatRequest) -> Run:
    return run_schedule(GenerationEngine(model), {0: [request]})[0]


def assert_same_as_alone(model, runs: list[Run], requests: list[ChatRequest]) -> None:
    """Same tokens, and the same logits up to reduction-order noise: a wrong position id or an attended
    padding column moves them by ~0.1 on this model, which greedy tokens alone would not always show."""
    for run, request in zip(runs, requests):
        single = alone(model, request)
        assert run.token_ids == single.token_ids
        assert run.events[-1].finish_reason == single.events[-1].finish_reason
        assert run.events[-1].prompt_tokens == single.events[-1].prompt_tokens
        for got, want in zip(run.logits, single.logits):
            assert_close_scaled(got, want, rel=LOGITS_REL)


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def check_stream(model, events: list[TokenEvent]) -> None:
    """Exactly one final event, last; deltas concatenate to the full decode; counters right."""
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    ids = token_ids(events)
    assert "".join(e.text for e in events) == model.tokenizer.decode(ids, **DECODE_KWARGS)
    assert events[-1].completion_tokens == len(ids)


# --------------------------------------------------------------------------------------------- fake model

STAGGERED = {  # step -> joiners; MIXED max_new_tokens are 10, 4, 12, 6
    0: [request(**MIXED[0]), request(**MIXED[1])],  # two at once
    2: [request(**MIXED[2])],                       # while both are mid-answer
    6: [request(**MIXED[3])],                       # after MIXED[1] finished, others still running
    30: [request(**MIXED[1])],                      # into an idle engine
}


def test_staggered_joins_equal_alone_greedy(model):
    engine = GenerationEngine(model)
    runs = run_schedule(engine, STAGGERED)
    requests = [r for step in sorted(STAGGERED) for r in STAGGERED[step]]
    assert_same_as_alone(model, runs, requests)
    assert {run.events[-1].finish_reason for run in runs} == {FinishReason.STOP, FinishReason.LENGTH}
    for run in runs:
        check_stream(model, run.events)
    assert engine.step() == [] and engine.kv_length == 0


def test_staggered_joins_equal_alone_seeded_sampling(model):
    def sampled(spec, seed):
        return replace(request(**spec), params=GenerationParams(
            max_new_tokens=spec["max_new_tokens"], do_sample=True, temperature=1.5, top_p=0.95, top_k=50,
            repetition_penalty=1.3, seed=seed))

    joins = {0: [sampled(MIXED[0], 1), request(**MIXED[2])], 3: [sampled(MIXED[3], 2)],
             5: [sampled(MIXED[1], 3), request(**MIXED[1])]}
    requests = [r for step in sorted(joins) for r in joins[step]]
    assert_same_as_alone(model, run_schedule(GenerationEngine(model), joins), requests)


def test_cancel_mid_answer_others_unaffected(model):
    joins = {0: [request(**MIXED[0]), request(**MIXED[2])], 1: [request(**MIXED[3])]}
    runs = run_schedule(GenerationEngine(model), joins, cancels={3: [1]})
    requests = [r for step in sorted(joins) for r in joins[step]]
    cancelled = runs[1].events
    assert cancelled[-1].finish_reason == FinishReason.CANCELLED and cancelled[-1].token_id is None
    check_stream(model, cancelled)
    assert runs[1].token_ids == alone(model, requests[1]).token_ids[:3]
    assert_same_as_alone(model, [runs[0], runs[2]], [requests[0], requests[2]])


def test_cancel_unknown_or_finished_handle_raises(model):
    engine = GenerationEngine(model)
    handle, = engine.add([request(max_new_tokens=1)])
    assert engine.step()[0][1].finish_reason == FinishReason.LENGTH
    with pytest.raises(KeyError):
        engine.cancel(handle)


def test_leaving_rows_trim_the_kv_columns(model):
    engine = GenerationEngine(model)
    long, short = request(**{**MIXED[3], "max_new_tokens": 2}), request(**MIXED[2])   # 7 clips vs 1 clip
    long_handle, short_handle = engine.add([long, short])
    long_len, short_len = (e.prompt_tokens for _, e in engine.step())
    assert long_len > short_len and engine.kv_length == long_len + 1
    engine.step()                         # the long request finishes (length 2)
    assert engine.handles == (short_handle,) and engine.kv_length == short_len + 2


def test_bad_request_in_add_leaves_the_batch_intact(model):
    engine = GenerationEngine(model)
    good = request(**MIXED[0])
    engine.add([good])
    first = [e for _, e in engine.step()]
    state = (engine.handles, engine.kv_length, engine.pending_logits.clone())
    wrong_size = ChatRequest(media=torch.zeros(2, 2, 3, FRAME * 2, FRAME * 2), prompt="q")
    placeholder_in_text = request(prompt="look: [<VID_PLH>]")
    for bad in (wrong_size, placeholder_in_text):
        with pytest.raises(ValueError):
            engine.add([request(**MIXED[2]), bad])
        assert (engine.handles, engine.kv_length) == state[:2]
        assert torch.equal(engine.pending_logits, state[2])
    rest = []
    while engine.num_active:
        rest += [e for _, e in engine.step()]
    assert token_ids(first + rest) == generate(model, [good])[0].token_ids


def test_generation_leaves_grad_mode_alone(model):
    engine = GenerationEngine(model)
    engine.add([request(max_new_tokens=3)])
    while engine.step():
        assert not torch.is_inference_mode_enabled()


# --------------------------------------------------------------------------------------------- visual cache

def keyed(spec: dict, key: str | None, **changes) -> ChatRequest:
    return replace(request(**spec), media_key=key, **changes)


def test_cache_hit_skips_vision_and_gives_identical_tokens(model):
    cache = VisualCache(max_bytes=1 << 30)
    engine = GenerationEngine(model, visual_cache=cache)
    calls = len(model.encoded_batches)
    first = run_schedule(engine, {0: [keyed(MIXED[0], "video-a")]})
    assert len(model.encoded_batches) == calls + 1 and len(cache) == 1
    again = run_schedule(engine, {0: [keyed(MIXED[0], "video-a")]})
    assert len(model.encoded_batches) == calls + 1            # served from the cache
    assert again[0].token_ids == first[0].token_ids
    assert all(torch.equal(x, y) for x, y in zip(again[0].logits, first[0].logits))   # bit-identical
    follow_up = keyed(MIXED[0], "video-a", history=(("q", "a"),))   # the next turn about the same video
    assert_same_as_alone(model, run_schedule(engine, {0: [follow_up]}), [replace(follow_up, media_key=None)])
    assert len(model.encoded_batches) == calls + 2            # only the uncached reference run encoded
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_cache_key_includes_instruction_and_media_type_and_none_is_never_cached(model):
    cache = VisualCache(max_bytes=1 << 30)
    engine = GenerationEngine(model, visual_cache=cache)
    calls = len(model.encoded_batches)
    run_schedule(engine, {0: [keyed(MIXED[2], "v"), keyed(MIXED[2], "v", instruction="Be brief."),
                              keyed(MIXED[2], None), keyed(MIXED[2], None)]})
    assert model.encoded_batches[calls:] == [4]               # one vision call for all misses
    assert len(cache) == 2 and cache.stats.misses == 2        # keyless requests are not even looked up
    image = replace(keyed(MIXED[2], "v"), media=media(1, 2, frames=1), media_type="image")
    run_schedule(engine, {0: [image]})
    assert model.encoded_batches[calls:] == [4, 1] and len(cache) == 3


def test_repeated_key_in_one_add_is_encoded_once(model):
    engine = GenerationEngine(model, visual_cache=None)        # dedup needs no cache
    calls = len(model.encoded_batches)
    a, b = keyed(MIXED[0], "same"), keyed(MIXED[0], "same", prompt="And then?")
    runs = run_schedule(engine, {0: [a, b, keyed(MIXED[1], "other")]})
    assert model.encoded_batches[calls:] == [2]
    assert_same_as_alone(model, runs[:2], [a, b])


def test_cache_evicts_least_recently_used_by_bytes():
    entry = torch.zeros(4, 8)                                  # 128 bytes in float32
    cache = VisualCache(max_bytes=3 * 128)
    keys = [VisualKey(f"k{i}", "video", None) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, entry)
    assert cache.get(keys[0]) is not None                     # k0 becomes most recently used
    cache.put(keys[3], entry)                                  # evicts k1, the least recently used
    assert [k in cache for k in keys] == [True, False, True, True]
    assert cache.stats.bytes == 3 * 128 and cache.stats.entries == 3
    cache.put(VisualKey("big", "video", None), torch.zeros(16, 8))   # larger than the whole cache: not stored
    assert len(cache) == 3
    view = torch.zeros(100, 8)[:4]                             # a view is stored as its own copy
    cache.put(keys[1], view)
    assert cache.get(keys[1]).untyped_storage().nbytes() == 128


def test_cache_is_thread_safe():
    cache = VisualCache(max_bytes=10 * 128)

    def worker(offset: int):
        for i in range(200):
            key = VisualKey(f"k{(i + offset) % 20}", "video", None)
            if cache.get(key) is None:
                cache.put(key, torch.zeros(4, 8))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats
    assert stats.hits + stats.misses == 800 and stats.entries == 10 and stats.bytes == 10 * 128
