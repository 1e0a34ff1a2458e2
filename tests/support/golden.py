"""The golden cases of the tiny fixture (tests/data/tiny-videochat/golden.json) as native requests."""
from __future__ import annotations

import torch

from support.paths import CASES, GOLDEN, TINY
from videochat.runtime.types import ChatRequest, GenerationParams

MAX_NEW_TOKENS = GOLDEN["generation_config"]["max_new_tokens"]


def load_golden_model():
    from videochat.model.videochat_model import VideoChatModel
    return VideoChatModel.from_checkpoint(TINY, device="cpu")


def load_golden_media() -> dict[str, torch.Tensor]:
    """case id -> media tensor [clips, T, 3, 224, 224], preprocessed as the case says."""
    from preprocessing import preprocess
    out = {}
    for case_id, case in CASES.items():
        pre = case["preprocess"]
        result = preprocess((TINY / case["video"]).read_bytes(), num_segments=pre["num_segments"],
                            resolution=pre["resolution"], hd_num=pre["hd_num"], padding=pre["padding"],
                            image=case["media_type"] == "image")
        out[case_id] = result.pixel_values[0]
        assert out[case_id].shape[0] == pre["num_clips"]
    return out


def golden_request(case: dict, media: dict[str, torch.Tensor], turn_index: int, history,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> ChatRequest:
    return ChatRequest(media=media[case["id"]], media_type=case["media_type"],
                       prompt=case["turns"][turn_index]["user_prompt"], history=history, msg=case["msg"],
                       instruction=case["instruction"], params=GenerationParams(max_new_tokens=max_new_tokens))
