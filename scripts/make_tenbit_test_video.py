"""Write a small 10/12-bit 4:2:0 test video (H.264 High 10 or HEVC Main 12) with PyAV's libx264/libx265.

Made for tests/test_preprocessing_tenbit.py: deep 4:2:0 frames with sharp colour edges (where
decord's FFmpeg 4.1 and FFmpeg 8 convert chroma differently) and smooth gradients (true 10/12-bit
precision, not 8-bit values shifted up). The YUV is computed here from an RGB pattern with the
BT.2020 non-constant-luminance matrix, limited range, and the stream is tagged accordingly (VUI),
as a phone's HDR clip is. The corpus files were made with:

    python scripts/make_tenbit_test_video.py tests/data/videos/h264_high10_bt2020_1280x720_30fps_1s.mp4
    python scripts/make_tenbit_test_video.py tests/data/videos/hevc_main12_bt2020_640x360_30fps_1s.mp4 \
        --codec libx265 --pix-fmt yuv420p12le --size 640x360
    python scripts/make_tenbit_test_video.py /tmp/x.mp4 --size 1920x1080   # timing only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np

KR, KB = 0.2627, 0.0593  # BT.2020 NCL luma coefficients


def pattern(t: int, width: int, height: int) -> np.ndarray:
    """RGB float [H, W, 3] in 0..1: hue/luma gradients, moving saturated bars and a moving disc."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / width, y / height
    rgb = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (u + t / 60)), 0.2 + 0.6 * v,
                    0.5 + 0.5 * np.cos(2 * np.pi * (u * 0.7 - v * 0.5))], axis=-1)
    bars = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1), (0, 0, 0)]
    bar_w = width // 16
    top, bottom = height // 8, height // 8 + height // 4
    for k, colour in enumerate(bars):  # sharp vertical chroma edges, sliding 3 px per frame
        left = (k * 2 * bar_w + 3 * t) % width
        rgb[top:bottom, left:left + bar_w] = colour
    stripes = ((y // 3) % 2 == 0) & (v > 0.55) & (v < 0.7)  # 3-row stripes: sharp horizontal chroma edges
    rgb[stripes] = (0.9, 0.1, 0.6)
    cx, cy, r = width * (0.3 + 0.4 * (t % 30) / 30), height * 0.8, height * 0.12
    rgb[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (0.1, 0.8, 0.2)
    return rgb


def to_yuv420(rgb: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.2020 NCL, limited range (10-bit: Y 64..940, Cb/Cr 64..960 around 512); chroma = mean of 2x2."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = KR * r + (1 - KR - KB) * g + KB * b
    cb, cr = (b - luma) / (2 * (1 - KB)), (r - luma) / (2 * (1 - KR))
    h, w = luma.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    k = 1 << (depth - 8)
    y = np.clip(np.rint(k * (16 + 219 * luma)), 16 * k, 235 * k)
    u = np.clip(np.rint(k * (128 + 224 * sub(cb))), 16 * k, 240 * k)
    v = np.clip(np.rint(k * (128 + 224 * sub(cr))), 16 * k, 240 * k)
    return y.astype(np.uint16), u.astype(np.uint16), v.astype(np.uint16)


def yuv_frame(planes: tuple[np.ndarray, np.ndarray, np.ndarray], width: int, height: int,
              pix_fmt: str) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, pix_fmt)
    for plane, data in zip(frame.planes, planes):
        dst = np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)
        dst[:, :data.shape[1]] = data
    return frame


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--crf", type=int, default=30)
    ap.add_argument("--codec", choices=["libx264", "libx265"], default="libx264")
    ap.add_argument("--pix-fmt", choices=["yuv420p10le", "yuv420p12le"], default="yuv420p10le")
    args = ap.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    depth = int(args.pix_fmt[len("yuv420p"):-len("le")])
    vui = f"colorprim=bt2020:transfer=bt2020-{depth}:colormatrix=bt2020nc"
    options = {"crf": str(args.crf), "preset": "medium"}
    if args.codec == "libx264":
        options["x264-params"] = vui
    else:
        options["x265-params"] = vui + ":log-level=error"
    with av.open(str(args.out), "w", format="mp4") as container:
        stream = container.add_stream(args.codec, rate=30, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, args.pix_fmt
        for t in range(args.frames):
            frame = yuv_frame(to_yuv420(pattern(t, width, height), depth), width, height, args.pix_fmt)
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
