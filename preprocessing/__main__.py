"""CLI: `python -m preprocessing VIDEO --out FILE.npy [options]`.

Writes pixel_values ([1, clips, T, 3, R, R] float32) as .npy and prints the metadata as JSON.
A rejected input exits with status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import VideoDecodeError
from .pipeline import preprocess


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__.splitlines()[0])
    p.add_argument("video", type=Path, help="video or image file")
    p.add_argument("--out", type=Path, required=True, help="output .npy for pixel_values")
    p.add_argument("--num-segments", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--hd-num", type=int, default=6)
    p.add_argument("--padding", action="store_true", help="HD mode with padding (model card: off)")
    p.add_argument("--image", action="store_true", help="one frame (T=1): a still image or a video's middle frame")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data = args.video.read_bytes()
        res = preprocess(data, num_segments=args.num_segments, resolution=args.resolution,
                         hd_num=args.hd_num, padding=args.padding, image=args.image)
    except (VideoDecodeError, ValueError, OSError) as exc:
        print(f"error: {args.video.name}: {exc}", file=sys.stderr)
        return 2
    np.save(args.out, res.pixel_values.numpy())
    print(json.dumps({**res.metadata.to_dict(), "shape": list(res.pixel_values.shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
