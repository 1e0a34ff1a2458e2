"""Streaming through the decoupled ensemble delivers several responses whose concatenation equals the unary
answer of the `decoupled: false` variant; unary ModelInfer on the decoupled ensemble is UNIMPLEMENTED."""
from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from conftest import TINY

FIELDS = dict(video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="Describe the action step by step.",
              max_new_tokens=12)


def test_stream_is_incremental_and_equals_unary(triton):
    streamed = triton.stream(**FIELDS)
    unary = triton.infer(model="videochat_unary", **FIELDS)
    assert streamed.responses >= 5                      # token by token, not one buffered answer
    assert streamed.text == unary.text and streamed.token_ids == unary.token_ids
    assert streamed.finish_reason == unary.finish_reason == "length"
    assert streamed.completion_tokens == unary.completion_tokens == 12
    assert streamed.prompt_tokens == unary.prompt_tokens > 0


def test_unary_infer_on_decoupled_ensemble_is_unimplemented(triton):
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model="videochat", **FIELDS)
    assert "UNIMPLEMENTED" in str(err.value.status())
