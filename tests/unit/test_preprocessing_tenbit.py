"""10/12-bit 4:2:0 sources against decord 0.6.0 (the reference): raw RGB frames and the final
pixel_values of the card's `load_video`. Real files, real decoders.

decord converts deep 4:2:0 with FFmpeg 4.1's swscale, whose vertical chroma step differs from FFmpeg 8's;
`preprocessing.decode._rgb_as_ffmpeg41` rebuilds 4.1's chroma rows (see its docstring). Files:
the corpus HEVC Main10 clip (untagged) and two made by scripts/make_tenbit_test_video.py (BT.2020-tagged
H.264 High 10 and HEVC Main 12, with sharp colour edges and 3-row chroma stripes).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from decord import VideoReader, cpu

from support.paths import VIDEOS
from preprocessing import Limits, preprocess
from preprocessing.decode import VideoSource, _rgb_as_ffmpeg41
from preprocessing.sampling import get_index
from support.reference_load_video import load_video

DEEP_420 = ["hevc_main10_1280x720_30fps_3s.mp4", "h264_high10_bt2020_1280x720_30fps_1s.mp4",
            "hevc_main12_bt2020_640x360_30fps_1s.mp4"]

# Measured (these 3 files, 8 frames each, both padding modes): raw RGB max |diff| 0 (bit-identical),
# pixel_values mean and max |diff| 0.0. With FFmpeg 8's own conversion they were RGB mean 1.0-3.0 /
# max 113-186 levels and pixel_values mean 0.015-0.050 / max 1.4-3.7. The pixel bounds are the float
# tolerance the 8-bit parity tests use (tests/test_preprocessing_parity.py), not a measured error.
RGB_MAX_ABS_DIFF = 0
PIXEL_MAX_ABS_DIFF = 1e-4
PIXEL_MEAN_ABS_DIFF = 1e-6


def _decord_frames(path: Path) -> tuple[list[int], np.ndarray]:
    vr = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    indices = get_index(len(vr), 8)
    return indices, vr.get_batch(indices).asnumpy()


def _first_frame(path: Path) -> av.VideoFrame:
    with av.open(str(path)) as container:
        return next(container.decode(video=0))


@pytest.mark.parametrize("name", DEEP_420)
def test_raw_rgb_matches_decord(name: str) -> None:
    indices, ref = _decord_frames(VIDEOS / name)
    ours = np.stack(VideoSource((VIDEOS / name).read_bytes(), limits=Limits()).read(indices, convert=lambda a: a))
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(np.int16) - ref).max() <= RGB_MAX_ABS_DIFF


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name", DEEP_420)
def test_pixel_values_match_load_video(name: str, padding: bool) -> None:
    ref = load_video(str(VIDEOS / name), num_segments=8, resolution=224, hd_num=6, padding=padding)
    res = preprocess((VIDEOS / name).read_bytes(), padding=padding)
    assert res.pixel_values.shape == ref.shape
    diff = (res.pixel_values - ref).abs()
    assert diff.max().item() <= PIXEL_MAX_ABS_DIFF
    assert diff.mean().item() <= PIXEL_MEAN_ABS_DIFF


def test_ffmpeg8_own_conversion_is_what_differs() -> None:
    """The cause, kept visible: the same decoded YUV through FFmpeg 8's swscale is off decord by up to
    ~190 levels at chroma edges; through our 4.1-style chroma rows it is exact."""
    path = VIDEOS / "hevc_main10_1280x720_30fps_3s.mp4"
    ref = VideoReader(str(path), ctx=cpu(0), num_threads=1)[0].asnumpy().astype(np.int16)
    frame = _first_frame(path)
    assert frame.format.name == "yuv420p10le"
    direct = np.abs(frame.to_ndarray(format="rgb24").astype(np.int16) - ref)
    assert direct.max() > 50 and direct.mean() > 0.3
    assert np.array_equal(_rgb_as_ffmpeg41(frame), ref)


def _blank(fmt: str, width: int, height: int) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, fmt)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    return frame


@pytest.mark.parametrize("fmt, width, height", [
    ("yuv420p", 64, 48),        # 8-bit: swscale's unscaled path, already identical to decord
    ("yuv422p10le", 64, 48),    # no vertical chroma step: already identical (research §2, ProRes)
    ("yuv444p10le", 64, 48),
    ("yuv420p10le", 64, 6),     # heights < 8 and odd sizes take other FFmpeg 4.1 code paths
    ("yuv420p10le", 66, 47),
    ("yuv420p10le", 65, 48),
])
def test_other_frames_keep_ffmpeg8_conversion(fmt: str, width: int, height: int) -> None:
    assert _rgb_as_ffmpeg41(_blank(fmt, width, height)) is None


def test_corpus_8bit_and_deep_files_take_the_intended_path() -> None:
    assert _rgb_as_ffmpeg41(_first_frame(VIDEOS / "testsrc2_h264_1280x720_30fps_10s.mp4")) is None
    for name in DEEP_420:
        assert _rgb_as_ffmpeg41(_first_frame(VIDEOS / name)) is not None
