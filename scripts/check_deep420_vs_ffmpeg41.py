"""Evidence for `preprocessing.decode._rgb_as_ffmpeg41`: calls decord's own bundled FFmpeg 4.1 swscale.

decord 0.6.0's wheel ships libswscale 5.3.100 (FFmpeg 4.1) in site-packages/decord.libs; decord converts
frames through an AVFilterGraph "scale=W:H" with an rgb24 buffersink (strings of libdecord.so), so
swscale with vf_scale's default flags. This script loads that library with ctypes and
1. converts the corpus HEVC Main10 frames (decoded by PyAV) with several flags: which equal decord;
2. does the same with PyAV's FFmpeg 8 swscale (none equals decord);
3. compares `_rgb_as_ffmpeg41` with FFmpeg 4.1 (bilinear) on random 10/12-bit planes over many sizes.

    python scripts/check_deep420_vs_ffmpeg41.py        # ~1 min on 2 cores; not part of the test suite
"""

from __future__ import annotations

import ctypes
import glob
import sys
from pathlib import Path

import av
import decord
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from preprocessing.decode import _plane_u16, _rgb_as_ffmpeg41  # noqa: E402

LIBS = Path(decord.__file__).parent.parent / "decord.libs"
_avutil = ctypes.CDLL(glob.glob(str(LIBS / "libavutil-*"))[0])  # local symbols: no clash with PyAV's FFmpeg
_sws = ctypes.CDLL(glob.glob(str(LIBS / "libswscale-*"))[0])
_avutil.av_get_pix_fmt.restype = ctypes.c_int
_avutil.av_get_pix_fmt.argtypes = [ctypes.c_char_p]
_sws.sws_getContext.restype = ctypes.c_void_p
_sws.sws_getContext.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 3
_PTR = ctypes.POINTER(ctypes.c_uint8)
_sws.sws_scale.argtypes = [ctypes.c_void_p, ctypes.POINTER(_PTR), ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                           ctypes.c_int, ctypes.POINTER(_PTR), ctypes.POINTER(ctypes.c_int)]
_sws.sws_freeContext.argtypes = [ctypes.c_void_p]
FLAGS = {"FAST_BILINEAR": 1, "BILINEAR": 2, "BICUBIC": 4, "POINT": 0x10, "AREA": 0x20}


def ffmpeg41_rgb24(planes: list[np.ndarray], fmt: str, flags: int = FLAGS["BILINEAR"]) -> np.ndarray:
    """sws_scale of FFmpeg 4.1 (default BT.601 limited-range tables, as for an untagged frame)."""
    height, width = planes[0].shape
    ctx = _sws.sws_getContext(width, height, _avutil.av_get_pix_fmt(fmt.encode()), width, height,
                              _avutil.av_get_pix_fmt(b"rgb24"), flags, None, None, None)
    assert ctx, "sws_getContext failed"
    planes = [np.ascontiguousarray(p, dtype=np.uint16) for p in planes]
    src = (_PTR * 4)(*[p.ctypes.data_as(_PTR) for p in planes], None)
    src_stride = (ctypes.c_int * 4)(*[p.strides[0] for p in planes], 0)
    out = np.zeros((height, width * 3 + 64), np.uint8)  # swscale may write a little past the row
    dst = (_PTR * 4)(out.ctypes.data_as(_PTR), None, None, None)
    dst_stride = (ctypes.c_int * 4)(out.strides[0], 0, 0, 0)
    _sws.sws_scale(ctx, src, src_stride, 0, height, dst, dst_stride)
    _sws.sws_freeContext(ctx)
    return out[:, :width * 3].reshape(height, width, 3)


def planes_of(frame: av.VideoFrame) -> list[np.ndarray]:
    return [_plane_u16(p).copy() for p in frame.planes]


def frame_of(planes: list[np.ndarray], fmt: str) -> av.VideoFrame:
    frame = av.VideoFrame(planes[0].shape[1], planes[0].shape[0], fmt)
    for plane, data in zip(frame.planes, planes):
        _plane_u16(plane)[:] = data
    frame.color_range = 1  # MPEG, as decoded streams are tagged
    return frame


def diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int16) - b)
    return f"mean {d.mean():.4f} max {d.max():3d}"


def main() -> None:
    path = ROOT / "tests" / "data" / "videos" / "hevc_main10_1280x720_30fps_3s.mp4"
    indices = [5, 16, 28, 39, 50, 61, 73, 84]
    ref = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1).get_batch(indices).asnumpy()
    with av.open(str(path)) as container:
        frames = [f for i, f in enumerate(container.decode(video=0)) if i in indices]
    print(f"{path.name}: |RGB - decord| over {len(indices)} frames")
    for name, flag in FLAGS.items():
        ours41 = np.stack([ffmpeg41_rgb24(planes_of(f), "yuv420p10le", flag) for f in frames])
        ours8 = np.stack([f.to_ndarray(format="rgb24", interpolation=name) for f in frames])
        print(f"  {name:14s} FFmpeg 4.1: {diff(ours41, ref)}   FFmpeg 8 (PyAV): {diff(ours8, ref)}")
    print(f"  _rgb_as_ffmpeg41:          {diff(np.stack([_rgb_as_ffmpeg41(f) for f in frames]), ref)}")

    rng = np.random.default_rng(0)
    sizes = [(w, 32) for w in range(2, 130, 2)] + [(64, h) for h in range(8, 80, 2)]
    sizes += [(1366, 768), (1280, 720), (1920, 1080), (3840, 2160)]
    for fmt, top in [("yuv420p10le", 1024), ("yuv420p12le", 4096)]:
        bad = []
        for width, height in sizes:
            planes = [rng.integers(0, top, (height, width)), rng.integers(0, top, (height // 2, width // 2)),
                      rng.integers(0, top, (height // 2, width // 2))]
            if not np.array_equal(_rgb_as_ffmpeg41(frame_of(planes, fmt)), ffmpeg41_rgb24(planes, fmt)):
                bad.append((width, height))
        print(f"{fmt}: random planes, {len(sizes)} sizes: {'all bit-exact' if not bad else f'differ at {bad}'}")


if __name__ == "__main__":
    main()
