"""Golden parity of the vision path on the tiny fixture (float32, CPU): per case, turn 0's intermediates
(ViT output before vision_layernorm, QFormer last hidden state incl. the instruction tokens of A3, project_up
output) and the merged `inputs_embeds`; plus batched `encode_media` == one request at a time (mixed images,
videos and instructions of different lengths, docs/model.md quirk Q15)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.paths import TINY
from support.numerics import assert_close_scaled
from preprocessing import preprocess
from videochat.model.videochat_model import VideoChatModel
from videochat.model.projection import merge_visual_tokens

FIXTURE = TINY
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
CASES = {c["id"]: c for c in GOLDEN["cases"]}
# Relative to the tensor's scale: a sum's error grows with the sum of |x|, an element's (or the mean's, min's,
# max's) with the mean |x|; a statistic near zero gets no help from its own size. Observed worst rel ~4e-5.
RTOL = 1e-4


@pytest.fixture(scope="module")
def model() -> VideoChatModel:
    torch.manual_seed(0)
    return VideoChatModel.from_checkpoint(FIXTURE, device="cpu")


# ------------------------------------------------------------------------------------------- media
def media_for(case: dict) -> torch.Tensor:
    """[N, T, 3, 224, 224] float32 of a golden case, made by the preprocessing package."""
    p = case["preprocess"]
    video = FIXTURE / case["video"]
    res = preprocess(video.read_bytes(), num_segments=p["num_segments"], resolution=p["resolution"],
                     hd_num=p["hd_num"], padding=p["padding"], image=case["media_type"] == "image")
    return res.pixel_values[0]


@pytest.fixture(scope="module")
def medias() -> dict[str, torch.Tensor]:
    return {cid: media_for(c) for cid, c in CASES.items()}


# ------------------------------------------------------------------------------------------- stats
def assert_stats(name: str, got: torch.Tensor, want: dict) -> float:
    """Compare a tensor with golden statistics; returns the max relative difference seen."""
    assert list(got.shape) == want["shape"], f"{name}: shape {list(got.shape)} vs {want['shape']}"
    g = got.detach().double()
    stats = {"sum": g.sum(), "mean": g.mean(), "abs_sum": g.abs().sum(), "std": g.std(), "min": g.min(), "max": g.max()}
    pairs = [(k, float(v), want[k]) for k, v in stats.items()]
    pairs += [(f"values_at{idx}", float(g[tuple(idx)]), val) for idx, val in want["values_at"]]
    mean_abs = want["abs_sum"] / g.numel()
    worst = 0.0
    for key, a, b in pairs:
        scale = want["abs_sum"] if key in ("sum", "abs_sum") else mean_abs
        assert abs(a - b) <= RTOL * max(abs(b), scale), f"{name}.{key}: {a} vs golden {b} (scale {scale:.3g})"
        worst = max(worst, abs(a - b) / max(abs(b), scale))
    return worst


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_intermediates_match_golden(model, medias, case_id):
    case = CASES[case_id]
    media = medias[case_id]
    want = case["turns"][0]["intermediates"]
    assert list(media.shape) == want["project_up_out"]["shape"][:1] + list(media.shape[1:])
    out, inter = model.encode_clips(media, [case["instruction"]] * media.shape[0], return_intermediates=True)
    for key in ("vision_encoder_out", "qformer_last_hidden_state", "project_up_out"):
        worst = assert_stats(f"{case_id}.{key}", inter[key], want[key])
        print(f"{case_id} {key}: max rel diff {worst:.2e}")

    # merged LLM input of turn 0: golden ids hold 0 at the placeholders
    turn = case["turns"][0]
    ids = torch.tensor(turn["input_ids"])
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    for start, end in turn["visual_placeholder_spans"]:
        mask[start:end] = True
    (visual,) = model.encode_media([media], [case["media_type"]], [case["instruction"]])
    embeds = merge_visual_tokens(model.embed_tokens(ids), mask, visual)
    assert_stats(f"{case_id}.inputs_embeds", embeds[None], turn["inputs_embeds"])


def test_batched_encode_media_equals_one_by_one(model, medias):
    a1, a3, a5 = medias["A1_example1_nopad"], medias["A3_example1_pad_instruction"], medias["A5_image_example1_nopad"]
    media = [a1, a5, a3[:2], a1[:1], a5[1:]]
    types = ["video", "image", "video", "video", "image"]
    instructions = [None, "describe the video.", CASES["A3_example1_pad_instruction"]["instruction"], "", None]
    batched = model.encode_media(media, types, instructions)
    for i in range(len(media)):
        (alone,) = model.encode_media([media[i]], [types[i]], [instructions[i]])
        assert batched[i].shape == (media[i].shape[0] * 96, model.config.llm.hidden_size)
        assert batched[i].dtype == model.dtype
        assert_close_scaled(batched[i], alone, rel=1e-5, msg=f"request {i}")


def test_encode_media_rejects_bad_input(model):
    with pytest.raises(ValueError, match="T == 1"):
        model.encode_media([torch.zeros(1, 2, 3, 224, 224)], ["image"], [None])
    with pytest.raises(ValueError, match="media_type"):
        model.encode_media([torch.zeros(1, 1, 3, 224, 224)], ["audio"], [None])
    with pytest.raises(ValueError, match=r"\[clips, T, 3, H, W\]"):
        model.encode_media([torch.zeros(1, 3, 224, 224)], ["video"], [None])
