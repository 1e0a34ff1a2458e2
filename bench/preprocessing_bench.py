"""Speed of `preprocessing.preprocess` vs the model card's `load_video` (decord), same videos.

    .venv/bin/python bench/preprocessing_bench.py [--repeats 7] [--threads 1] [--padding]

Runs the two implementations interleaved (ref, ours, ref, ours, ...) so machine noise hits both,
reports medians and min, checks the outputs agree (max abs diff), prints a table and writes
bench/results/preprocessing.json. The reference reads the file path, as the card does; ours gets
the bytes in memory, as the Triton model does (reading a file of a few MB is < 1 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from preprocessing import preprocess  # noqa: E402
from reference_load_video import load_video  # noqa: E402

VIDEOS = ROOT / "tests" / "data" / "videos"
CASES = [
    ("720p testsrc2 10s", "testsrc2_h264_1280x720_30fps_10s.mp4"),
    ("1080p testsrc2 5s", "testsrc2_h264_1920x1080_30fps_5s.mp4"),
    ("1080p smptehdbars 10s", "smptehdbars_h264_1920x1080_30fps_10s.mp4"),
    ("4K testsrc2 1s", "testsrc2_h264_3840x2160_30fps_1s.mp4"),
    ("160x120 2 min (3600 f)", "long_160x120_h264_30fps_2min.mp4"),
]


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_one(path: Path, *, repeats: int, padding: bool) -> dict:
    data = path.read_bytes()
    ref_fn = lambda: load_video(str(path), num_segments=8, resolution=224, hd_num=6, padding=padding)  # noqa: E731
    ours_fn = lambda: preprocess(data, num_segments=8, resolution=224, hd_num=6, padding=padding).pixel_values  # noqa: E731
    ref_out, ours_out = ref_fn(), ours_fn()  # warm-up (and the outputs to compare)
    ref_t, ours_t = [], []
    for _ in range(repeats):
        ref_t.append(_timed(ref_fn)[0])
        ours_t.append(_timed(ours_fn)[0])
    return {
        "file": path.name, "bytes": len(data), "shape": list(ours_out.shape),
        "reference_median_s": statistics.median(ref_t), "reference_min_s": min(ref_t),
        "ours_median_s": statistics.median(ours_t), "ours_min_s": min(ours_t),
        "speedup_median": statistics.median(ref_t) / statistics.median(ours_t),
        "speedup_min": min(ref_t) / min(ours_t),
        "max_abs_diff": (ours_out - ref_out).abs().max().item(),
        "reference_runs_s": ref_t, "ours_runs_s": ours_t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--padding", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both (1 = one request per core, as a Triton instance; "
                         "2-thread OpenMP collapses when the 2 shared cores are busy)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "preprocessing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'video':<24} {'reference s':>12} {'ours s':>8} {'speed-up':>9} {'(min)':>6} {'max|diff|':>10}")
    for label, name in CASES:
        r = bench_one(VIDEOS / name, repeats=args.repeats, padding=args.padding)
        r["video"] = label
        rows.append(r)
        print(f"{label:<24} {r['reference_median_s']:>12.3f} {r['ours_median_s']:>8.3f} "
              f"{r['speedup_median']:>8.2f}x {r['speedup_min']:>5.2f}x {r['max_abs_diff']:>10.1e}", flush=True)
    result = {
        "command": f"python bench/preprocessing_bench.py --repeats {args.repeats} --threads {args.threads}"
                   + (" --padding" if args.padding else ""),
        "what": "end-to-end seconds per call, num_segments=8, resolution=224, hd_num=6, "
                f"padding={args.padding}; implementations interleaved; median and min of {args.repeats}",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "note": "2 cores shared with other jobs: timings are noisy, compare within a row"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
