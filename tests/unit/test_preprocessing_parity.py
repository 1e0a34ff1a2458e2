"""`preprocess` against the model card's `load_video` (tests/support/reference_load_video.py, decord) side by
side, both padding modes, several sizes and aspect ratios; and against the golden fixture's
preprocessing statistics (tolerances of tests/data/tiny-videochat/README.md: values_at atol 1e-4, sums rtol 1e-5,
fp16 .npy 2e-3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support.paths import ROOT, DATA
from preprocessing import preprocess
from preprocessing.__main__ import main as cli_main
from support.reference_load_video import load_video

VIDEOS = DATA / "videos"
FIXTURE = DATA / "tiny-videochat"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
# Normalised pixels are bounded by the ImageNet mean/std (|x| <= 2.7), so this absolute bound is ~4e-5 of the
# values' magnitude: float rounding of the resize, never a different pixel (one uint8 level is >= 0.017).
ATOL = 1e-4
# fp16 .npy files: half an fp16 step at |x| <= 2.7 is 2**-10; 2e-3 also absorbs one step of double rounding.
FP16_ATOL = 2e-3


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("path", [
    VIDEOS / "example1.mp4",                                   # 640x480 MPEG-4 (real clip)
    VIDEOS / "portrait_testsrc2_h264_720x1280_30fps_5s.mp4",   # portrait: 180-degree path
    VIDEOS / "rotate90_testsrc2_h264_1280x720_5s.mp4",         # display-matrix rotation
    VIDEOS / "odd_size_vp9_333x197.webm",                      # odd size, VP9
    VIDEOS / "long_160x120_h264_30fps_2min.mp4",               # upscaling, 3600 frames
    FIXTURE / "videos" / "synthetic_portrait.mp4",
], ids=lambda p: p.name)
def test_matches_reference_load_video(path: Path, padding: bool) -> None:
    ref, msg = load_video(str(path), num_segments=8, return_msg=True, resolution=224, hd_num=6, padding=padding)
    res = preprocess(path.read_bytes(), padding=padding)
    assert res.pixel_values.shape == ref.shape
    assert (res.pixel_values - ref).abs().max().item() <= ATOL
    assert res.metadata.message == msg


def test_image_of_a_video_is_load_video_with_one_segment() -> None:
    path = VIDEOS / "example1.mp4"
    ref = load_video(str(path), num_segments=1, resolution=224, hd_num=6)
    res = preprocess(path.read_bytes(), image=True)
    assert res.pixel_values.shape == ref.shape == (1, 3, 1, 3, 224, 224)
    assert (res.pixel_values - ref).abs().max().item() <= ATOL


def _golden_cases() -> list[dict]:
    return GOLDEN["cases"]


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["id"])
def test_golden_preprocess_statistics(case: dict) -> None:
    pre = case["preprocess"]
    image = case["media_type"] == "image"
    res = preprocess((FIXTURE / case["video"]).read_bytes(), num_segments=pre["num_segments"],
                     resolution=pre["resolution"], hd_num=pre["hd_num"], padding=pre["padding"], image=image)
    media = res.pixel_values[0] if image else res.pixel_values  # the image case stored [N, 1, 3, R, R]
    meta = res.metadata
    assert meta.frame_indices == pre["frame_indices"]
    assert meta.message == pre["return_msg"]
    assert meta.num_frames == pre["video_num_frames"] and meta.fps == pre["video_fps"]
    assert [meta.height, meta.width] == pre["video_hw"]
    assert list(meta.canvas_hw) == pre["hd_frame_hw"] and meta.num_clips == pre["num_clips"]
    stats = pre["media"]
    assert list(media.shape) == stats["shape"]
    for index, value in stats["values_at"]:
        assert media[tuple(index)].item() == pytest.approx(value, abs=ATOL), index
    m64 = media.double()
    assert m64.sum().item() == pytest.approx(stats["sum"], rel=1e-5)
    assert m64.abs().sum().item() == pytest.approx(stats["abs_sum"], rel=1e-5)
    assert m64.min().item() == pytest.approx(stats["min"], abs=ATOL)
    assert m64.max().item() == pytest.approx(stats["max"], abs=ATOL)
    per_clip = m64.reshape(pre["num_clips"], -1, 3 * 224 * 224) if image else m64[0].flatten(2)
    abs_sums = np.array(pre["per_clip_frame_abs_sum"])
    np.testing.assert_allclose(per_clip.sum(-1).numpy(), np.array(pre["per_clip_frame_sum"]),
                               rtol=1e-5, atol=1e-5 * abs_sums.max())
    np.testing.assert_allclose(per_clip.abs().sum(-1).numpy(), abs_sums, rtol=1e-5)


def test_golden_fp16_tensors() -> None:
    a1 = np.load(FIXTURE / "media_A1_example1_nopad_frames0and4_fp16.npy")
    a5 = np.load(FIXTURE / "media_A5_image_example1_nopad_full_fp16.npy")
    data = (FIXTURE / "videos" / "example1.mp4").read_bytes()
    video = preprocess(data).pixel_values[0, :, ::4].half().float().numpy()
    image = preprocess(data, image=True).pixel_values[0].half().float().numpy()
    np.testing.assert_allclose(video, a1.astype(np.float32), atol=FP16_ATOL, rtol=0)
    np.testing.assert_allclose(image, a5.astype(np.float32), atol=FP16_ATOL, rtol=0)


def test_cli_writes_npy_and_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pv.npy"
    assert cli_main([str(VIDEOS / "example1.mp4"), "--padding", "--out", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    arr = np.load(out)
    assert arr.shape == tuple(meta["shape"]) == (1, 5, 8, 3, 224, 224) and arr.dtype == np.float32
    assert meta["clip_grid"] == [2, 2] and meta["frame_indices"] == [2, 7, 12, 17, 22, 26, 31, 36]
    ref = load_video(str(VIDEOS / "example1.mp4"), num_segments=8, resolution=224, hd_num=6, padding=True)
    assert np.abs(arr - ref.numpy()).max() <= ATOL


def test_cli_rejects_with_exit_2_and_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "preprocessing", str(VIDEOS / "image.png"), "--out",
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "use image=True" in proc.stderr
    assert not (tmp_path / "x.npy").exists()


def test_concurrent_calls_give_identical_results() -> None:
    from concurrent.futures import ThreadPoolExecutor
    data = (VIDEOS / "vfr_h264_320x240_180f.mp4").read_bytes()
    single = preprocess(data, padding=True).pixel_values
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: preprocess(data, padding=True).pixel_values, range(8)))
    assert all(torch.equal(o, single) for o in outs)
