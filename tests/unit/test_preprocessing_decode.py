"""Decoding with PyAV: every corpus file behaves as its manifest says; the right frames come out
(index-coded videos, in every container, including where decord is wrong); pixels equal decord's;
limits refuse decompression bombs from the header, fast; errors are plain-language."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from decord import VideoReader, cpu

from support.paths import ROOT
from preprocessing import Limits, VideoDecodeError, preprocess
from preprocessing.decode import VideoSource
from preprocessing.sampling import get_index
from support.reference_load_video import load_video

VIDEOS = ROOT / "tests" / "data" / "videos"
MANIFEST = json.loads((VIDEOS / "manifest.json").read_text())["files"]
BY_NAME = {f["file"]: f for f in MANIFEST}
# Big files are covered by the parity tests and the benchmark; keep this suite fast.
_SLOW = {"testsrc2_h264_3840x2160_30fps_1s.mp4", "testsrc2_h264_1920x1080_30fps_5s.mp4",
         "smptehdbars_h264_1920x1080_30fps_10s.mp4", "testsrc2_h264_1280x720_30fps_10s.mp4"}
REJECT_WORDS = {  # manifest file -> words the error message must contain
    "zero_bytes.mp4": "empty",
    "image.png": "use image=True",
    "audio_only_aac.m4a": "no video stream",
    "truncated_half_moov_at_end.mp4": "truncated",
    "random_bytes_64k.mp4": "not a recognizable",
}


def _read(name: str) -> bytes:
    return (VIDEOS / name).read_bytes()


def _index_code(rgb: np.ndarray, kind: str) -> int:
    """Frame number from the corpus's colour code (manifest index_code_scheme)."""
    h, w, _ = rgb.shape
    if kind == "solid":
        block = rgb[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    else:
        bw, bh = max(w // 6, 16), max(h // 6, 16)
        block = rgb[bh // 4: 3 * bh // 4, bw // 4: 3 * bw // 4]
    digits = np.round((block.reshape(-1, 3).mean(0) - 16) / 32).astype(int)
    return int(digits[0] + 8 * digits[1] + 64 * digits[2])


@pytest.mark.parametrize("entry", [f for f in MANIFEST if f["file"] not in _SLOW], ids=lambda f: f["file"])
def test_every_corpus_file_behaves_as_manifest_expects(entry: dict) -> None:
    data = _read(entry["file"])
    if entry["expected"].startswith("reject"):
        with pytest.raises(VideoDecodeError) as err:
            preprocess(data)
        msg = str(err.value)
        assert REJECT_WORDS[entry["file"]] in msg
        assert "/" not in msg and ".cc" not in msg and "\n" not in msg
        return
    res = preprocess(data)
    meta = res.metadata
    assert res.pixel_values.shape == (1, 3, 8, 3, 224, 224)
    assert res.pixel_values.dtype.is_floating_point and bool(res.pixel_values.isfinite().all())
    assert meta.num_frames == entry["decoded_frames"]
    assert meta.frame_indices == entry["reference_indices_8"]
    assert meta.fps == pytest.approx(entry["avg_fps"], rel=1e-4)
    assert (meta.width, meta.height) == (entry["display_width"], entry["display_height"])
    json.dumps(meta.to_dict())


INDEX_CODED = [f for f in MANIFEST if f.get("index_code") and f["file"] not in _SLOW]


@pytest.mark.parametrize("entry", INDEX_CODED, ids=lambda f: f["file"])
def test_index_coded_videos_return_the_requested_frames(entry: dict) -> None:
    src = VideoSource(_read(entry["file"]), limits=Limits())
    n = src.info.num_frames
    indices = get_index(n, 8) + [0, n - 1, n // 3, n // 3]  # unsorted, repeated, both ends
    frames = src.read(indices, convert=lambda a: a)
    if entry["rotation_deg"]:
        frames = [np.rot90(f, -entry["rotation_deg"] // 90) for f in frames]  # code sits in the coded frame
    assert [_index_code(f, entry["index_code"]) for f in frames] == [i % 512 for i in indices]
    expected = "selective" if src.info.container in ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm") else "sequential"
    assert src.strategy == expected


def test_avi_with_b_frames_is_exact_where_decord_is_wrong() -> None:
    name = "idx_solid_mpeg4_320x240_300f.avi"
    indices = get_index(300, 8)
    ours = VideoSource(_read(name), limits=Limits()).read(indices, convert=lambda a: a)
    theirs = VideoReader(str(VIDEOS / name), ctx=cpu(0), num_threads=1).get_batch(indices).asnumpy()
    assert [_index_code(f, "solid") for f in ours] == indices
    assert [_index_code(f, "solid") for f in theirs] != indices  # the reference decoder's bug


@pytest.mark.parametrize("name", ["example1.mp4", "rotate90_testsrc2_h264_1280x720_5s.mp4",
                                  "odd_size_vp9_333x197.webm", "vfr_h264_320x240_180f.mp4",
                                  "bt709_tagged_h264_1280x720_30fps_3s.mp4", "idx_solid_mjpeg_320x240_150f.mov"])
def test_pixels_bit_identical_to_decord(name: str) -> None:
    vr = VideoReader(str(VIDEOS / name), ctx=cpu(0), num_threads=1)
    indices = get_index(len(vr), 8)
    ref = vr.get_batch(indices).asnumpy()
    src = VideoSource(_read(name), limits=Limits())
    assert src.info.num_frames == len(vr)
    ours = np.stack(src.read(indices, convert=lambda a: a))
    assert ours.shape == ref.shape  # rotation applied as decord does (rotate90: 1280 high)
    assert np.array_equal(ours, ref)


def test_image_mode() -> None:
    png = preprocess(_read("image.png"), image=True)
    assert png.pixel_values.shape == (1, 3, 1, 3, 224, 224)
    assert (png.metadata.media_type, png.metadata.num_frames, png.metadata.message) == ("image", 1, "")
    gif = preprocess(_read("animated.gif"), image=True)  # GIF is a video: its middle frame
    assert gif.metadata.frame_indices == get_index(20, 1)
    one = preprocess(_read("idx_one_frame_h264_320x240.mp4"))  # a one-frame mp4 is a valid video
    assert one.metadata.frame_indices == [0] * 8


def _gif_bomb(side: int) -> bytes:
    """35-byte GIF whose header declares side x side (the decoder would allocate side^2 * 4 B)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"


_BOMB_CHILD = """
import resource, sys
from preprocessing import VideoDecodeError, preprocess
small, bomb = (bytes.fromhex(a) for a in sys.argv[1:])
preprocess(small, image=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    preprocess(bomb)
except VideoDecodeError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_decompression_bomb_rejected_from_header() -> None:
    """In a fresh process, so that its peak RSS says what this one call allocated."""
    args = [_gif_bomb(16).hex(), _gif_bomb(16000).hex()]
    out = subprocess.run([sys.executable, "-c", _BOMB_CHILD, *args], capture_output=True, check=True,
                         cwd=ROOT).stdout.decode().splitlines()
    assert "too large" in out[0]
    # Decoding the frame would allocate 16000^2 * 4 B = 1 GB; refused from the header it allocates ~nothing.
    assert int(out[1]) < 64 * 1024, out  # KiB


def test_limits_refuse_before_decoding() -> None:
    data = _read("long_160x120_h264_30fps_2min.mp4")
    for limits, words in [(Limits(max_bytes=len(data) - 1), "too large"),
                          (Limits(max_pixels=160 * 120 - 1), "too large"),
                          (Limits(max_frames=3599), "too long"),
                          (Limits(max_duration_s=119.0), "too long")]:
        start = time.perf_counter()
        with pytest.raises(VideoDecodeError, match=words):
            preprocess(data, limits=limits)
        # Decoding the 3600 frames takes seconds; refusing from the header takes milliseconds. The bound is
        # loose so that a slow or busy machine passes; what it catches is a decode before the check.
        assert time.perf_counter() - start < 1.0, limits
    with pytest.raises(VideoDecodeError, match="num_segments"):
        preprocess(data, num_segments=0)


def test_live_webm_without_header_count_is_limited_while_indexing() -> None:
    with pytest.raises(VideoDecodeError, match="too long"):
        preprocess(_read("live_nocues_vp8_opus_640x480_5s.webm"), limits=Limits(max_frames=100))


# scripts/make_editlist_mp4.py: 30 index-coded frames, GOPs at 0/8/16/24, the edit list hides frames 0..4.
EDITLIST = "editlist_hides5_h264_64x64_30f.mp4"


def test_edit_list_hidden_frames_are_frames_as_decord_counts_them() -> None:
    path = VIDEOS / EDITLIST
    data = path.read_bytes()
    with av.open(io.BytesIO(data)) as container:  # the edit list is real: FFmpeg's player view has 25 frames
        assert sum(1 for _ in container.decode(video=0)) == 25
    vr = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    indices = get_index(len(vr), 8)
    res = preprocess(data)
    meta = res.metadata
    assert meta.num_frames == len(vr) == 30 and meta.frame_indices == indices == [1, 5, 8, 12, 15, 19, 23, 26]
    _, msg = load_video(str(path), num_segments=8, return_msg=True, hd_num=6)
    assert meta.message == msg
    # decord's own index model: frame i starts at (i - 5) / 30 s, the hidden frames at negative times.
    assert meta.pts_seconds == pytest.approx(vr.get_frame_timestamp(indices)[:, 0].tolist(), abs=1e-6)

    src = VideoSource(data, limits=Limits())
    everything = src.read(list(range(30)), convert=lambda a: _index_code(a, "solid"))
    assert everything == list(range(30)) and src.strategy == "selective"  # hidden frames decode too
    sequential = src._read_sequential(list(range(30)), lambda a: _index_code(a, "solid"))  # the fallback agrees
    assert [sequential[i] for i in range(30)] == everything

    ours = np.stack(src.read(indices, convert=lambda a: a))
    theirs = vr.get_batch(indices).asnumpy()
    second_key = vr.get_key_indices()[1]  # 8
    seeked = [k for k, i in enumerate(indices) if i >= second_key]
    # Where decord seeks (every index past the first GOP) its frames are ours, bit for bit.
    assert len(seeked) == 6 and np.array_equal(ours[seeked], theirs[seeked])
    # In the first GOP decord decodes forward from the start, where its FFmpeg drops the hidden frames
    # but its counter does not: index i gives frame i + 5 (so 1 -> 6, 5 -> 10, then 8 -> 8). Its bug.
    assert [_index_code(theirs[k], "solid") for k, i in enumerate(indices) if i < second_key] == [6, 10]
