"""End to end against the official outputs (golden.json): bytes -> preprocessing -> VideoChatModel -> generation.

* every case, every turn, chained through the history that `generate` returns: greedy `generated_ids` and
  `response` exact, history == `chat_history_after`, first-step top-5 ids exact and logits within 3e-5 of their magnitude;
* one mixed batch of every turn of every case (3/5/7 clips, padding on and off, image and video, with and
  without instruction, histories of 0-2 turns, different max_new_tokens): each request == its golden tokens.
"""
from __future__ import annotations

import pytest
import torch

from support.golden import MAX_NEW_TOKENS, golden_request
from support.numerics import assert_close_scaled
from support.paths import CASES, GOLDEN
from videochat.runtime.chat_format import normalize_history
from videochat.runtime.detokenize import DECODE_KWARGS
from videochat.runtime.generation import first_step_logits, generate
from videochat.runtime.types import FinishReason

TOP5 = len(GOLDEN["cases"][0]["turns"][0]["first_step_top5"]["ids"])
# tests/data/tiny-videochat/README.md: observed <= 3e-5 across implementations on logits of magnitude 25-40
# (rel ~1e-6)
LOGITS_REL = 3e-5


@pytest.mark.parametrize("case_id", list(CASES))
def test_case_turn_by_turn(golden_model, golden_media, case_id):
    case = CASES[case_id]
    history = ()
    for turn_index, turn in enumerate(case["turns"]):
        request = golden_request(case, golden_media, turn_index, history)
        top5 = first_step_logits(golden_model, [request])[0].topk(TOP5)
        assert top5.indices.tolist() == turn["first_step_top5"]["ids"], f"turn {turn_index}"
        assert_close_scaled(top5.values, torch.tensor(turn["first_step_top5"]["logits"]), rel=LOGITS_REL)
        result = generate(golden_model, [request])[0]
        assert result.token_ids == turn["generated_ids"], f"turn {turn_index}"
        assert result.text == turn["response"]
        assert result.finish_reason == (FinishReason.STOP if turn["stopped_on_eos"] else FinishReason.LENGTH)
        assert result.prompt_tokens == len(turn["input_ids"])
        assert result.history == normalize_history(turn["chat_history_after"])
        history = result.history


def test_mixed_batch_equals_golden(golden_model, golden_media):
    """Every turn of every case in ONE batch, with golden histories and staggered max_new_tokens."""
    requests, expected, expected_top5 = [], [], []
    for case in CASES.values():
        for turn_index, turn in enumerate(case["turns"]):
            history = normalize_history(case["turns"][turn_index - 1]["chat_history_after"]) if turn_index else ()
            max_new = MAX_NEW_TOKENS - len(requests) % 4 * 3  # 12, 9, 6, 3, 12, ...
            requests.append(golden_request(case, golden_media, turn_index, history, max_new_tokens=max_new))
            expected.append(turn["generated_ids"][:max_new])
            expected_top5.append(turn["first_step_top5"])
    assert len({r.num_clips for r in requests}) >= 3 and len({len(r.history) for r in requests}) == 3
    top5 = first_step_logits(golden_model, requests).topk(TOP5)
    assert top5.indices.tolist() == [t["ids"] for t in expected_top5]
    assert_close_scaled(top5.values, torch.tensor([t["logits"] for t in expected_top5]), rel=LOGITS_REL)
    results = generate(golden_model, requests)
    for request, result, ids in zip(requests, results, expected):
        assert result.token_ids == ids, request.prompt
        assert result.text == golden_model.tokenizer.decode(ids, **DECODE_KWARGS)
    assert {r.finish_reason for r in results} == {FinishReason.STOP, FinishReason.LENGTH}
