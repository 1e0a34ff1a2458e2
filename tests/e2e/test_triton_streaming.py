"""Streaming through the decoupled ensemble delivers several responses whose concatenation equals the unary
answer of the `decoupled: false` variant; unary ModelInfer on the decoupled ensemble is UNIMPLEMENTED."""
from __future__ import annotations

import pytest
from videochat_client import VideoChatError

from support.paths import TINY
from support.server import answer_of, token_responses

FIELDS = dict(video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="Describe the action step by step.",
              max_new_tokens=12)


def test_stream_is_incremental_and_equals_unary(triton):
    chunks = triton.stream_chunks(**FIELDS)
    streamed = answer_of(chunks)
    unary = triton.infer(model="videochat_unary", **FIELDS)
    assert token_responses(chunks) >= 5                 # token by token, not one buffered answer
    assert streamed.text == unary.text and streamed.token_ids == unary.token_ids
    assert streamed.finish_reason == unary.finish_reason == "length"
    assert streamed.usage.completion_tokens == unary.usage.completion_tokens == 12
    assert streamed.usage.prompt_tokens == unary.usage.prompt_tokens > 0


def test_unary_infer_on_decoupled_ensemble_is_unimplemented(triton):
    with pytest.raises(VideoChatError) as err:
        triton.infer(model="videochat", **FIELDS)
    assert err.value.code == "UNIMPLEMENTED"
