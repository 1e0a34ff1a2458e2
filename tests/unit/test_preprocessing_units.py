"""Pure helpers of `preprocessing`: frame sampling, the card's message, HD geometry, Limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preprocessing.hd_transform import finish_canvas, hd_geometry, resize_frame
from preprocessing.limits import Limits
from preprocessing.sampling import card_message, get_index
from support.reference_load_video import HD_transform_padding
from support.reference_load_video import get_index as ref_get_index
from preprocessing import VideoDecodeError
from torchvision.transforms.functional import normalize as _tv_normalize


def torchvision_normalise(x: torch.Tensor) -> torch.Tensor:
    return _tv_normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_get_index_matches_card_examples_and_bankers_rounding() -> None:
    assert get_index(40, 8) == [2, 7, 12, 17, 22, 26, 31, 36]
    assert get_index(31, 8) == [1, 5, 9, 12, 16, 20, 23, 27]
    assert get_index(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert get_index(1, 1) == [0]
    # seg = 39/2 = 19.5 -> np.round gives 20 (half to even), Python's int(x + 0.5) would too, but
    # seg*1 = 2.5 -> 2 distinguishes banker's rounding from half-up.
    assert get_index(21, 8)[1] == int(20 / 8 / 2) + 2


@pytest.mark.parametrize("num_segments", [1, 2, 8, 16, 32])
def test_get_index_equals_reference_for_many_lengths(num_segments: int) -> None:
    for n in range(1, 700):
        assert get_index(n, num_segments) == ref_get_index(n, num_segments).tolist(), n


def test_card_message_format() -> None:
    assert card_message([2, 7, 12, 17, 22, 26, 31, 36], fps=5.0) == (
        "The video contains 8 frames sampled at 0.4, 1.4, 2.4, 3.4, 4.4, 5.2, 6.2, 7.2 seconds.")
    assert card_message([19], fps=5.0) == "The video contains 1 frames sampled at 3.8 seconds."


@pytest.mark.parametrize(("hw", "resize", "canvas", "grid"), [
    ((480, 640), (336, 448), (448, 448), (2, 2)),   # docs/preprocessing.md load_video examples, hd_num=6
    ((640, 360), (378, 672), (448, 672), (2, 3)),   # portrait: squashed into landscape
    ((160, 512), (210, 672), (224, 672), (1, 3)),
    ((1080, 1920), (378, 672), (448, 672), (2, 3)),
])
def test_padding_geometry_spec_examples(hw, resize, canvas, grid) -> None:
    g = hd_geometry(height=hw[0], width=hw[1], padding=True, hd_num=6)
    assert (g.resize_h, g.resize_w) == resize
    assert g.canvas_hw == canvas
    assert (g.rows, g.cols) == grid
    assert g.num_clips == grid[0] * grid[1] + 1
    assert g.turned == (hw[1] < hw[0])


@pytest.mark.parametrize("hw", [(480, 640), (640, 360), (1080, 1920), (197, 333), (2000, 100)])
def test_no_padding_is_always_224x448(hw) -> None:
    g = hd_geometry(height=hw[0], width=hw[1], padding=False, hd_num=1)
    assert g.canvas_hw == (224, 448) and g.num_clips == 3 and not g.turned


def _card_tail(canvas: torch.Tensor, r: int = 224) -> torch.Tensor:
    """The card's normalise + tiles + global view (load_video after the HD transform)."""
    canvas = torchvision_normalise(canvas.div(255.0))
    t, _, h, w = canvas.shape
    sub = canvas.reshape(1, t, 3, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4, 6).reshape(-1, t, 3, r, r)
    glb = F.interpolate(canvas, size=(r, r), mode="bicubic", align_corners=False).unsqueeze(0)
    return torch.cat([sub, glb])


@pytest.mark.parametrize("hw", [(480, 640), (640, 360), (51, 97), (97, 51)])
def test_padding_transform_bit_identical_to_card(hw) -> None:
    rng = np.random.default_rng(hw[0])
    frames = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    ref = _card_tail(HD_transform_padding(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), hd_num=6))
    g = hd_geometry(height=hw[0], width=hw[1], padding=True, hd_num=6)
    resized = torch.stack([resize_frame(f, size=(g.resize_h, g.resize_w), turn=g.turned) for f in frames])
    mine = finish_canvas(resized, geometry=g)
    assert mine.shape == (g.num_clips, 2, 3, 224, 224)
    assert torch.equal(ref, mine)


def test_bicubic_is_unclamped() -> None:
    """Quirk Q9 (docs/model.md): float bicubic overshoots past 0..255 at hard edges and that must survive."""
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, 32:] = 255
    out = resize_frame(frame, size=(224, 448))
    assert out.max() > 255 and out.min() < 0


def test_limits_defaults_and_validation() -> None:
    lim = Limits()
    lim.check_frame_size(width=3840, height=2160)  # 4K must pass (manifest)
    lim.check_length(num_frames=3600, duration_s=120.0)
    with pytest.raises(VideoDecodeError, match="too large"):
        lim.check_frame_size(width=16000, height=16000)
    with pytest.raises(VideoDecodeError, match="too long"):
        lim.check_length(duration_s=3 * 3600.0)
    with pytest.raises(ValueError):
        Limits(max_bytes=0)
    with pytest.raises(Exception):
        lim.max_bytes = 1  # frozen
