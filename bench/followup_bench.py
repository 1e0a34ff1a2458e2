"""Follow-ups without re-upload: 5-turn conversations about a 1080p clip and a large one (>= 100 MB), with
follow-ups by `media_key` (the default) against re-sending the bytes every turn (`media_reference=False`), one
replica (`python -m videochat serve`, demo checkpoint, CPU, default caches), short answers.

    .venv/bin/python bench/followup_bench.py [--checkpoint DIR] [--turns 5] [--repeats 2] [--large-mb 120]

Per clip and mode: video bytes uploaded per conversation, the first turn's latency, and the follow-ups'
(turns 2..N) time to first token and latency (medians, min-max), plus the server's counters (references served
from the cache, misses, re-uploads, video bytes received). The modes alternate, one conversation each per
repeat; every conversation is new (its own session), but the clip is the same, so in both modes the follow-ups
hit the server's caches: the difference is what the upload itself costs (bytes over gRPC, the client's
serialization, and the server hashing the bytes again). The large clip is generated with PyAV (lossless
x264 of noise, so it does not compress) into a temp dir, never into the repository.
Writes bench/results/followup.json and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _server import VIDEOS, demo_checkpoint, serve, spread, write_json

from videochat_client import VideoChatClient
from videochat_client.metrics import scrape

QUESTIONS = ("Describe the video.", "What colours are there?", "Is there any text?", "What moves?",
             "Summarize it in one sentence.")
COUNTERS = ("videochat_media_reference_hits_total", "videochat_media_reference_misses_total",
            "videochat_media_reuploads_total", "videochat_request_video_bytes_sum",
            "videochat_request_video_bytes_count")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the serve command's demo checkpoint")
    p.add_argument("--hd-clip", type=Path, default=VIDEOS / "testsrc2_h264_1920x1080_30fps_5s.mp4")
    p.add_argument("--large-mb", type=int, default=120, help="size of the generated large clip (>= 100)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="conversations per clip and mode")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", default="followup.json")
    return p.parse_args(argv)


def make_large_clip(path: Path, target_mb: int) -> Path:
    """1080p noise, lossless x264 (PyAV; the ffmpeg CLI may be missing): noise does not compress, so the size
    is set by the frame count. Stops once the file passes target_mb."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"qp": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        written = 0
        for _ in range(400):
            luma = rng.integers(0, 256, (1080, 1920), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(np.stack([luma] * 3, axis=-1), format="rgb24")
            for packet in stream.encode(frame):
                written += packet.size
                out.mux(packet)
            if written >= target_mb * 1e6:
                break
        for packet in stream.encode():
            out.mux(packet)
    return path


def conversation(client: VideoChatClient, data: bytes, *, media_reference: bool, turns: int,
                 max_new_tokens: int) -> dict:
    conv = client.conversation(data, media_reference=media_reference)
    answers = [conv.ask(QUESTIONS[k % len(QUESTIONS)], max_new_tokens=max_new_tokens) for k in range(turns)]
    return {"bytes_uploaded": conv.video_bytes_sent, "reuploads": conv.reuploads,
            "first_turn_ms": answers[0].timings.latency_ms,
            "followup_ttft_ms": [a.timings.time_to_first_token_ms for a in answers[1:]],
            "followup_latency_ms": [a.timings.latency_ms for a in answers[1:]],
            "per_turn_bytes": [a.video_bytes_sent for a in answers], "texts": [a.text for a in answers]}


def summarize(runs: list[dict]) -> dict:
    ttft = [v for r in runs for v in r["followup_ttft_ms"] if v is not None]
    lat = [v for r in runs for v in r["followup_latency_ms"]]
    return {"conversations": len(runs), "bytes_per_conversation": statistics.median(r["bytes_uploaded"] for r in runs),
            "per_turn_bytes": runs[0]["per_turn_bytes"], "reuploads": sum(r["reuploads"] for r in runs),
            "first_turn_ms": spread([r["first_turn_ms"] for r in runs]),
            "followup_ttft_ms": spread(ttft), "followup_latency_ms": spread(lat)}


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = (args.checkpoint or demo_checkpoint()).resolve()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="videochat-followup-") as tmp:
        large = make_large_clip(Path(tmp) / "large_noise_1080p.mp4", args.large_mb)
        clips = [("1080p", args.hd_clip), ("large", large)]
        results = []
        with serve(["--checkpoint", str(checkpoint), "--device", "cpu"], Path(tmp) / "server") as served, \
                VideoChatClient(served.grpc_url, timeout=600) as client:
            for name, path in clips:
                data = path.read_bytes()
                before = scrape(served.metrics_url)
                runs: dict[str, list[dict]] = {"reference": [], "reupload": []}
                for _ in range(args.repeats):
                    for mode in runs:
                        runs[mode].append(conversation(client, data, media_reference=mode == "reference",
                                                       turns=args.turns, max_new_tokens=args.max_new_tokens))
                after = scrape(served.metrics_url)
                same = all(r["texts"] == runs["reference"][0]["texts"] for rs in runs.values() for r in rs)
                results.append({"clip": name, "file": path.name if name != "large" else "generated (ffmpeg)",
                                "bytes": len(data), "answers_identical_across_modes": same,
                                "modes": {m: summarize(rs) for m, rs in runs.items()},
                                "server": {c: after.get(c) - before.get(c) for c in COUNTERS}})
                del data
            command = served.command
    payload = {"bench": "followup", "server": command, "turns": args.turns, "repeats": args.repeats,
               "max_new_tokens": args.max_new_tokens, "checkpoint": "demo" if args.checkpoint is None else str(checkpoint),
               "clips": results, "wall_s": time.perf_counter() - t_start}
    path = write_json(args.out, payload)
    print(f"{'clip':8} {'MB':>7} {'mode':10} {'MB/conv':>9} {'1st turn ms':>12} {'follow-up TTFT ms':>18} "
          f"{'follow-up latency ms':>21}")
    for r in results:
        for mode, s in r["modes"].items():
            print(f"{r['clip']:8} {r['bytes'] / 1e6:7.1f} {mode:10} {s['bytes_per_conversation'] / 1e6:9.1f} "
                  f"{s['first_turn_ms']['median']:12.0f} {s['followup_ttft_ms']['median']:18.1f} "
                  f"{s['followup_latency_ms']['median']:21.1f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
