"""Continuous batching on the real tiny fixture: every golden turn joins a running `GenerationEngine` at a
different step (two at once, mid-answer of others, after others finished, into an idle engine) and must still
produce golden.json's `generated_ids` and `response`; with a `VisualCache` keyed per video, the later turns of
a case skip the vision pass and still give the golden tokens."""
from __future__ import annotations

from dataclasses import replace

import pytest

from support.golden import golden_request
from support.paths import CASES
from videochat.runtime.chat_format import normalize_history
from videochat.runtime.engine import GenerationEngine
from videochat.runtime.types import FinishReason
from videochat.runtime.visual_cache import VisualCache

# join step of each golden turn, in case/turn order (9 turns of 12 tokens): 0 and 0 together, joins while
# others are mid-answer, 14 and 16 after the first ones finished, 40 into an idle engine
JOIN_STEPS = (0, 0, 1, 3, 5, 8, 14, 16, 40)
MAX_STEPS = 60


def golden_turns():
    """(case id, request kwargs, golden turn) for every turn, with the golden history of the turns before."""
    for case in CASES.values():
        for turn_index, turn in enumerate(case["turns"]):
            history = normalize_history(case["turns"][turn_index - 1]["chat_history_after"]) if turn_index else ()
            yield case, turn_index, history, turn


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_staggered_golden_turns(golden_model, golden_media, monkeypatch, cached):
    turns = list(golden_turns())
    assert len(turns) == len(JOIN_STEPS)
    requests = [golden_request(case, golden_media, turn_index, history) for case, turn_index, history, _ in turns]
    if cached:   # the server's media_key: one per video + preprocessing, the same for every turn of a case
        requests = [replace(r, media_key=case["id"]) for r, (case, *_) in zip(requests, turns)]
    encoded: list[int] = []
    encode_media = golden_model.encode_media
    monkeypatch.setattr(golden_model, "encode_media", lambda m, *a: encoded.append(len(m)) or encode_media(m, *a))

    engine = GenerationEngine(golden_model, visual_cache=VisualCache(1 << 30) if cached else None)
    handles, ids, texts, reasons = [], {}, {}, {}
    for step in range(MAX_STEPS):
        joining = [r for r, s in zip(requests, JOIN_STEPS) if s == step]
        if joining:
            assert step != JOIN_STEPS[-1] or engine.num_active == 0
            handles += engine.add(joining)
        for handle, event in engine.step():
            ids.setdefault(handle, []).append(event.token_id)
            texts[handle] = texts.get(handle, "") + event.text
            reasons[handle] = event.finish_reason
    assert engine.num_active == 0 and len(handles) == len(turns)

    for handle, (case, turn_index, _, turn) in zip(handles, turns):
        where = f"{case['id']} turn {turn_index}"
        assert ids[handle] == turn["generated_ids"], where
        assert texts[handle] == turn["response"], where
        assert reasons[handle] == (FinishReason.STOP if turn["stopped_on_eos"] else FinishReason.LENGTH), where
    if cached:   # each case's video is encoded once: the two A1 turns of step 0 share one encode; the turns
        # joining later (A1 turn 2, A3 turn 1, A4 turn 1) are cache hits, and an add of hits only runs no vision
        assert encoded == [1] * len(CASES) and engine.visual_cache.stats.hits == 3
    else:        # one vision call per add, for all its requests
        assert len(encoded) == len(set(JOIN_STEPS)) and sum(encoded) == len(turns)
