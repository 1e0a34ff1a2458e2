"""Batched generation engine against a fake model (tiny random Mistral + seeded fake visual tokens):
batched == one by one token for token (greedy and seeded sampling), equality with HF `generate`, streaming
deltas == final decode, EOS masked at step 0, cancellation, finish reasons, history as a value, sampling filters
== HF warpers."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from support.fakes import MIXED, TOKENS_PER_CLIP, FakeModel, media, request
from videochat.runtime.chat_format import build_prompt
from videochat.runtime.detokenize import DECODE_KWARGS, IncrementalDetokenizer
from videochat.runtime.generation import generate, generate_stream
from videochat.runtime.sampling import filter_top_k_top_p
from videochat.runtime.types import ChatRequest, FinishReason, GenerationParams, validate_media

@pytest.fixture(scope="module")
def model():
    return FakeModel()


def test_batched_greedy_equals_one_by_one(model):
    requests = [request(**spec) for spec in MIXED]
    alone = [generate(model, [r])[0] for r in requests]
    batched = generate(model, requests)
    # the mix must exercise both ways of finishing while batch-mates go on
    assert {r.finish_reason for r in alone} == {FinishReason.STOP, FinishReason.LENGTH}
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert a.prompt_tokens == b.prompt_tokens
    assert len({tuple(r.token_ids) for r in batched}) == len(batched)  # the requests really differ


@pytest.mark.parametrize("penalty", [1.0, 0.2])  # < 1 rewards repeats: visible here
def test_matches_hf_generate(model, penalty):
    """One request through our engine == HF `generate(inputs_embeds=...)`, the reference's call (with
    min_new_tokens=1 standing in for the reference's min_length quirk), also with a repetition penalty."""
    req = request(**{**MIXED[0], "max_new_tokens": 16}, repetition_penalty=penalty)
    prompt = build_prompt(model.tokenizer, media_type=req.media_type, num_clips=req.num_clips,
                          tokens_per_clip=TOKENS_PER_CLIP, prompt=req.prompt, history=req.history)
    embeds = model.reference.get_input_embeddings()(prompt.input_ids).detach().clone()
    embeds[prompt.placeholder_mask] = model.encode_media([req.media], ["video"], [None])[0]
    with torch.no_grad():
        ref = model.reference.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, prompt.length,
                                 dtype=torch.long), max_new_tokens=req.params.max_new_tokens, do_sample=False,
                                 min_new_tokens=1, eos_token_id=model.tokenizer.eos_token_id, pad_token_id=0,
                                 repetition_penalty=penalty)
    ours = generate(model, [req])[0]
    if penalty != 1.0:  # the penalty must matter for this case to test anything
        assert ours.token_ids != generate(model, [request(**{**MIXED[0], "max_new_tokens": 16})])[0].token_ids
    assert ours.token_ids == ref[0].tolist()
    assert ours.text == model.tokenizer.batch_decode(ref, **DECODE_KWARGS)[0]
    assert ours.prompt_tokens == prompt.length


def test_one_vision_call_per_batch(model):
    before = model.encode_calls
    generate(model, [request(**spec) for spec in MIXED])
    assert model.encode_calls == before + 1


def test_stream_deltas_concatenate_to_decode(model):
    requests = [request(**spec) for spec in MIXED]
    texts, ids = [""] * len(requests), [[] for _ in requests]
    finished = [0] * len(requests)
    for step in generate_stream(model, requests):
        assert len(step) == len(requests)
        for i, event in enumerate(step):
            if event is None:
                continue
            assert not finished[i], "a finished request must not emit again"
            texts[i] += event.text
            ids[i].append(event.token_id)
            assert event.completion_tokens == len(ids[i])
            finished[i] += event.finished
    assert finished == [1] * len(requests)
    for text, token_ids in zip(texts, ids):
        assert text == model.tokenizer.decode(token_ids, **DECODE_KWARGS)


def test_generation_leaves_grad_mode_alone(model):
    for _ in generate_stream(model, [request(max_new_tokens=3)]):
        assert not torch.is_inference_mode_enabled()


class _EosFirst(torch.nn.Module):
    """Wraps the LLM so that EOS is always the arg-max."""

    def __init__(self, llm, eos_id):
        super().__init__()
        self.inner, self.model, self.config, self.eos_id = llm, llm.model, llm.config, eos_id

    def forward(self, *args):
        logits = self.inner(*args)
        logits[..., self.eos_id] = logits.max() + 1
        return logits


def test_eos_masked_at_first_step_then_stops(model):
    eos = model.tokenizer.eos_token_id
    eos_model = SimpleNamespace(**{k: getattr(model, k) for k in ("config", "tokenizer", "device", "dtype",
                                                                   "encode_media")}, llm=_EosFirst(model.llm, eos))
    result = generate(eos_model, [request(max_new_tokens=5)])[0]
    assert len(result.token_ids) == 2 and result.token_ids[0] != eos and result.token_ids[1] == eos
    assert result.finish_reason == FinishReason.STOP == "stop"
    assert result.text == model.tokenizer.decode(result.token_ids[:1], **DECODE_KWARGS)


def test_finish_reasons_history_and_counts(model):
    history = (("q1", "a1"),)
    req = request(history=history, max_new_tokens=3)
    result = generate(model, [req])[0]
    assert result.finish_reason == FinishReason.LENGTH
    assert result.completion_tokens == len(result.token_ids) == 3
    assert result.history == (("q1", "a1"), (req.prompt, result.text))
    assert req.history == history


def test_cancel_one_request_others_unaffected(model):
    requests = [request(**spec) for spec in MIXED[:3]]
    steps = {"n": 0}

    def should_stop(i):
        return i == 1 and steps["n"] >= 2

    results_events = []
    for events in generate_stream(model, requests, should_stop):
        steps["n"] += 1
        results_events.append(events)
    cancelled = [e[1] for e in results_events if e[1] is not None]
    assert [e.token_id is None for e in cancelled] == [False, False, True]
    assert cancelled[-1].finish_reason == FinishReason.CANCELLED and cancelled[-1].finished
    full = generate(model, requests, should_stop=lambda i: i == 1)
    assert full[1].finish_reason == FinishReason.CANCELLED and full[1].token_ids == []
    alone = [generate(model, [r])[0].token_ids for r in requests]
    assert [full[0].token_ids, full[2].token_ids] == [alone[0], alone[2]]


def test_seeded_sampling_independent_of_batch_mates(model):
    sampled = [ChatRequest(media=media(3, 5), prompt="Tell me.",
                           params=GenerationParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95,
                                                   top_k=50, repetition_penalty=1.3, seed=seed))
               for seed in (11, 12)]
    alone = [generate(model, [r])[0].token_ids for r in sampled]
    mixed = generate(model, [request(**MIXED[0]), sampled[0], request(**MIXED[2]), sampled[1]])
    assert [mixed[1].token_ids, mixed[3].token_ids] == alone
    assert alone[0] != alone[1]  # different seeds, different samples
    greedy = generate(model, [ChatRequest(media=media(3, 5), prompt="Tell me.",
                                          params=GenerationParams(max_new_tokens=10))])[0].token_ids
    assert alone[0] != greedy


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (7, 0.5), (0, 1.0)])
def test_filters_match_hf_warpers(top_k, top_p):
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(top_k))
    expected = logits
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_top_k_top_p(logits[0], top_k=top_k, top_p=top_p), expected[0])


def test_incremental_detokenizer_matches_full_decode(model):
    tok = model.tokenizer
    rng = random.Random(0)
    vocab = len(tok)
    for trial in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.push(i) for i in ids]
        streamed = "".join(deltas) + detok.finish()
        assert streamed == tok.decode(ids, **DECODE_KWARGS), ids
        assert all("\ufffd" not in d[-1:] for d in deltas)


def test_incomplete_utf8_is_held_back(model):
    tok = model.tokenizer
    euro = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode()]
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in euro] == ["", "", "€"]
    detok = IncrementalDetokenizer(tok)
    assert detok.push(euro[0]) == "" and detok.finish() == tok.decode(euro[:1], **DECODE_KWARGS)


def test_request_validation():
    with pytest.raises(ValueError):
        validate_media(torch.zeros(3, 2, 3, 8), "video")
    with pytest.raises(ValueError):
        ChatRequest(media=torch.zeros(3, 2, 3, 8, 8), prompt="q", media_type="image")
    with pytest.raises(ValueError):
        ChatRequest(media=torch.zeros(3, 2, 4, 8, 8), prompt="q")
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationParams(top_p=0.0)
    req = ChatRequest(media=torch.zeros(3, 1, 3, 8, 8), prompt="q", media_type="image", history=[["a", "b"]])
    assert req.history == (("a", "b"),) and req.media_type == "image"
