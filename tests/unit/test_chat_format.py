"""Chat format: the prompt string and the per-piece tokenisation reproduce the official `chat()` exactly
(every case and turn of golden.json: `conversation`, `input_ids`, `visual_placeholder_spans`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.paths import TINY
from videochat.runtime.chat_format import (PLACEHOLDER_TOKEN_ID, MediaType, append_turn, build_conversation, build_prompt,
                                   normalize_history)

FIXTURE = TINY
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
CONFIG = json.loads((FIXTURE / "config.json").read_text())
BRIDGE = CONFIG["model_config"]["bridge"]
TOKENS_PER_CLIP = BRIDGE["num_query_token"] + BRIDGE["extra_num_query_token"]
TURNS = [(case, index) for case in GOLDEN["cases"] for index in range(len(case["turns"]))]


@pytest.fixture(scope="module")
def tokenizer():
    from videochat.model.tokenization import SentencePieceLlamaTokenizer
    return SentencePieceLlamaTokenizer.from_dir(str(FIXTURE / "llm_tokenizer"))


def _history_before(case: dict, turn_index: int) -> tuple[tuple[str, str], ...]:
    return normalize_history(case["turns"][turn_index - 1]["chat_history_after"]) if turn_index else ()


@pytest.mark.parametrize("case,turn_index", TURNS, ids=[f"{c['id']}-t{i}" for c, i in TURNS])
def test_golden_prompt_and_ids(tokenizer, case, turn_index):
    turn = case["turns"][turn_index]
    num_clips = case["preprocess"]["num_clips"]
    prompt = build_prompt(tokenizer, media_type=case["media_type"], num_clips=num_clips,
                          tokens_per_clip=TOKENS_PER_CLIP, prompt=turn["user_prompt"],
                          history=_history_before(case, turn_index), msg=case["msg"],
                          instruction=case["instruction"])
    assert prompt.conversation == turn["conversation"]
    assert prompt.input_ids.tolist() == turn["input_ids"]
    assert [list(span) for span in prompt.spans] == turn["visual_placeholder_spans"]
    expected_mask = torch.zeros(len(turn["input_ids"]), dtype=torch.bool)
    for start, end in turn["visual_placeholder_spans"]:
        expected_mask[start:end] = True
    assert torch.equal(prompt.placeholder_mask, expected_mask)
    assert int(prompt.placeholder_mask.sum()) == turn["num_visual_tokens"] == num_clips * TOKENS_PER_CLIP
    assert (prompt.input_ids[prompt.placeholder_mask] == PLACEHOLDER_TOKEN_ID).all()


def test_every_piece_gets_bos_and_leading_inst_gets_lone_space(tokenizer):
    prompt = build_prompt(tokenizer, media_type=MediaType.VIDEO, num_clips=2, tokens_per_clip=3, prompt="Q")
    ids = prompt.input_ids.tolist()
    bos = tokenizer.bos_token_id
    piece_starts = [0] + [end for _, end in prompt.spans]
    assert [ids[i] for i in piece_starts] == [bos] * 3
    lone_space = tokenizer.convert_tokens_to_ids("▁")
    assert ids[1:3] == [lone_space, tokenizer.convert_tokens_to_ids("[INST]")]
    assert prompt.spans == ((piece_starts[1] - 3, piece_starts[1]), (piece_starts[2] - 3, piece_starts[2]))


def test_history_answer_glued_and_literal_eos(tokenizer):
    text = build_conversation(media_type="image", num_clips=1, prompt="Q2", history=(("Q1", "A1 "),), msg="m  ")
    assert text == "[INST] <Image>[<IMG_PLH>]</Image>m[/INST] [INST] Q1 [/INST]A1 </s> [INST] Q2 [/INST]"
    ids = build_prompt(tokenizer, media_type="image", num_clips=1, tokens_per_clip=2, prompt="Q2",
                       history=(("Q1", "A1 "),)).input_ids.tolist()
    assert tokenizer.eos_token_id in ids


def test_instruction_prepended_without_separator():
    text = build_conversation(media_type="video", num_clips=1, prompt="Q", instruction="Watch.")
    assert text.startswith("Watch.[INST] <Video>")


def test_history_is_a_value():
    history = (("q", "a"),)
    after = append_turn(history, "q2", "a2")
    assert history == (("q", "a"),) and after == (("q", "a"), ("q2", "a2"))
    assert normalize_history([["q", "a"]]) == (("q", "a"),)
    with pytest.raises(ValueError):
        normalize_history([("only one",)])


def test_placeholder_in_user_text_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="must not contain"):
        build_prompt(tokenizer, media_type="video", num_clips=1, tokens_per_clip=2, prompt="x [<VID_PLH>] y")


def test_bad_media_type_and_clips():
    with pytest.raises(ValueError):
        build_conversation(media_type="audio", num_clips=1, prompt="q")
    with pytest.raises(ValueError):
        build_conversation(media_type="video", num_clips=0, prompt="q")
