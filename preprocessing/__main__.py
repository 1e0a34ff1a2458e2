"""CLI: `python -m preprocessing VIDEO --out FILE.npy [options]`.

Writes pixel_values ([1, clips, T, 3, R, R] float32) as .npy and prints the metadata as JSON.
Exit status 2, with one `error: ...` line on stderr, for bad flags, a video that cannot be read or that the
preprocessing rejects, and an --out that cannot be written; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .pipeline import preprocess

EXIT_USAGE = 2


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


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")  # as np.save
    if out.is_dir() or not out.parent.is_dir():   # checked before decoding, not after all the work
        return _error(f"cannot write --out {out}: " + ("Is a directory" if out.is_dir() else
                                                        f"no such folder {out.parent}"))
    try:
        data = args.video.read_bytes()
    except OSError as exc:   # missing, a directory, no permission
        return _error(f"cannot read {args.video}: {exc.strerror or exc}")
    try:
        res = preprocess(data, num_segments=args.num_segments, resolution=args.resolution,
                         hd_num=args.hd_num, padding=args.padding, image=args.image)
    except ValueError as exc:   # VideoDecodeError (a ValueError) or an out-of-range option
        return _error(f"{args.video.name}: {exc}")
    try:
        np.save(out, res.pixel_values.numpy())
    except OSError as exc:   # its folder is missing or not writable
        return _error(f"cannot write --out {out}: {exc.strerror or exc}")
    print(json.dumps({**res.metadata.to_dict(), "shape": list(res.pixel_values.shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
