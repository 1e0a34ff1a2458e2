"""Writes tests/data/videos/editlist_hides5_h264_64x64_30f.mp4: an MP4 whose edit list hides its first 5 frames.

    .venv/bin/python scripts/make_editlist_mp4.py [--out PATH]

30 frames of H.264 (libx264, B-frames, 64x64, 30 fps), index-coded "solid" like the corpus (manifest
index_code_scheme: frame k is RGB(16+32*(k%8), 16+32*((k//8)%8), 16+32*((k//64)%8))), k counted over
all 30 coded frames in presentation order. The frames get pts -5..24: FFmpeg's mov muxer then writes an
edit list starting at pts 0, so a player shows 25 frames - the file a stream-copy cut (`ffmpeg -ss T
-c copy`) produces, where the pre-roll from the previous keyframe stays in the file but is hidden.
64x64 because decord 0.6.0 fails on some small widths (research note §1); 64 works.
"""

from __future__ import annotations

import argparse
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "videos" / "editlist_hides5_h264_64x64_30f.mp4"
FRAMES, HIDDEN, SIDE, FPS = 30, 5, 64, 30


def code(k: int) -> tuple[int, int, int]:
    return 16 + 32 * (k % 8), 16 + 32 * ((k // 8) % 8), 16 + 32 * ((k // 64) % 8)


def make() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, FPS)
        # One thread: the bytes are reproducible. Short GOP so sampled frames lie in several GOPs.
        stream.codec_context.options = {"g": "8", "bf": "2", "threads": "1"}
        for k in range(FRAMES):
            rgb = np.empty((SIDE, SIDE, 3), np.uint8)
            rgb[:] = code(k)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = k - HIDDEN, Fraction(1, FPS)  # negative pts -> hidden by the edit list
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    data = make()
    assert b"elst" in data, "the muxer wrote no edit list"
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
