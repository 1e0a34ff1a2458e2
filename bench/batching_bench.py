"""Dynamic batching gain: the same `python -m videochat serve` configuration with batching on
(`--max-batch-size 16`) and off (`--max-batch-size 1`), the same closed-loop workload at concurrency 16 driven by
the client's load tool (`videochat_client.loadtest`), requests/s ratio. Both servers run side by side and the
load alternates between them round by round (A B, B A, ...), so the noise of the shared CPUs hits both alike.

    .venv/bin/python bench/batching_bench.py [--checkpoint DIR] [--workload video|image|all] [--rounds 3]
        [--turns 2] [--same-media] [--with-static-baseline]

Workloads (each a real request a user would send; the defaults are the model card's where it has one):
* video: a 6 s 640x360 H.264 clip from the test corpus, 8 frames, padding off (3 clips x 8 frames), greedy,
  64 new tokens;
* image: a PNG with image=true (3 views x 1 frame), greedy, 200 new tokens (the card's max_new_tokens).
Sessions: each loadtest session is one conversation of `--turns` questions about its OWN copy of the media
(the file plus a trailing MP4 `free` box / bytes after PNG's IEND: identical pixels, a different sha256), fresh
for every level, so the content caches hit only inside a conversation (turn 2+), as with real users re-sending
their video each turn. `--same-media` sends the one file for everything (every request after the first is a
cache hit). `--with-static-baseline` adds a third server with the pre-in-flight configuration (static batching per
execute, one response per token, no caches) at the same --max-batch-size.
Writes bench/results/batching.json; prints one summary line per workload. Also reports the batch sizes the
`videochat_llm` step really executed (Triton's statistics API), the scheduler's mean running batch per decode
step and its joins (metrics port), and the mean time per stage.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from _server import VIDEOS, serve, stats_delta, spread, write_json

from videochat_client.loadtest import LoadConfig, run_loadtest
from videochat_client.protocol import MediaOptions

WORKLOADS = {
    "video": dict(path=VIDEOS / "faststart_h264_640x360_6s.mp4", media=MediaOptions(), max_new_tokens=64),
    "image": dict(path=VIDEOS / "image.png", media=MediaOptions(image=True), max_new_tokens=200),
}
PROMPTS = ("Describe the video in detail.", "What happens at the end?", "What colors do you see?")
STATIC_ARGS = ["--batching", "static", "--stream-interval-ms", "0", "--media-cache-mb", "0", "--visual-cache-mb", "0"]
_copies = itertools.count()


def distinct_copies(path: Path, n: int, out_dir: Path) -> list[str]:
    """n copies of `path` with different bytes and the same decoded pixels (trailing MP4 `free` box; PNG
    decoders stop at IEND and ignore it too)."""
    data = path.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for _ in range(n):
        i = next(_copies)
        tail = f"videochat-bench-copy-{i:06d}".encode()
        copy = out_dir / f"{i:06d}{path.suffix}"
        copy.write_bytes(data + struct.pack(">I", 8 + len(tail)) + b"free" + tail)
        paths.append(str(copy))
    return paths


def scheduler_counters(served) -> dict[str, float]:
    """The videochat_llm scheduler's and caches' counters from the metrics port (summed over series)."""
    with urllib.request.urlopen(served.metrics_url, timeout=10) as r:
        text = r.read().decode()
    names = ("videochat_decode_steps_total", "videochat_decode_step_sequences_total", "videochat_inflight_joins_total",
             "videochat_visual_cache_hits_total", "videochat_visual_cache_misses_total",
             "videochat_media_cache_hits_total", "videochat_media_cache_misses_total",
             "videochat_stream_responses_total")
    out = {}
    for name in names:
        out[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    for phase in ("add", "step", "send"):   # the results keep their microsecond keys
        seconds = re.findall(rf'^videochat_scheduler_seconds_total{{[^}}]*phase="{phase}"[^}}]*}} (\S+)$', text, re.M)
        out[f"videochat_scheduler_{phase}_us_total"] = sum(float(v) for v in seconds) * 1e6
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the serve command's demo checkpoint")
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the workload's value")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batching server")
    p.add_argument("--requests", type=int, default=48, help="requests per measured level")
    p.add_argument("--rounds", type=int, default=3, help="measured levels per server and workload")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `python -m videochat serve` argument for BOTH servers (repeatable), "
                        "e.g. --serve-arg=--preprocess-instances=1")
    p.add_argument("--turns", type=int, default=1, help="questions per conversation (same media each turn)")
    p.add_argument("--same-media", action="store_true", help="one media file for every session (cache hits)")
    p.add_argument("--with-static-baseline", action="store_true",
                   help="also run the pre-in-flight configuration (" + " ".join(STATIC_ARGS) + ")")
    p.add_argument("--out", default="batching.json")
    return p.parse_args(argv)


async def level(url: str, served, workload: dict, args, requests: int) -> dict:
    sessions = -(-requests // args.turns)
    videos = ([str(workload["path"])] if args.same_media else
              distinct_copies(workload["path"], sessions, Path(args.copies_dir)))
    cfg = LoadConfig(url=url, videos=videos, concurrency=[args.concurrency], requests=requests,
                     max_new_tokens=workload["max_new_tokens"], prompts=PROMPTS, media=workload["media"],
                     timeout=600.0, turns=args.turns)
    before, counters0 = served.snapshot(), scheduler_counters(served)
    report = await run_loadtest(cfg, progress_stream=None)
    time.sleep(0.5)   # decoupled requests are counted when released
    counters = {k: v - counters0[k] for k, v in scheduler_counters(served).items()}
    steps = counters["videochat_decode_steps_total"]
    lv = report["levels"][0]
    return {"requests_per_second": lv["requests_per_second"], "successful_requests": lv["successful_requests"],
            "failed_requests": lv["failed_requests"], "errors": lv["errors"], "duration_s": lv["duration_s"],
            "output_tokens_per_second": lv["output_tokens_per_second"],
            "latency_ms_p50": (lv["latency_ms"] or {}).get("p50"),
            "ttft_ms_p50": (lv.get("time_to_first_token_ms") or {}).get("p50"),
            "mean_active_per_decode_step": counters["videochat_decode_step_sequences_total"] / steps if steps else None,
            "scheduler": counters,
            "triton": stats_delta(before, served.snapshot())}


def run_workload(name: str, servers: dict, args) -> dict:
    workload = dict(WORKLOADS[name])
    if args.max_new_tokens:
        workload["max_new_tokens"] = args.max_new_tokens
    runs = {key: [] for key in servers}
    for served in servers.values():   # warm-up: first-call costs (allocations, lazy imports) off the clock
        asyncio.run(level(served.grpc_url, served, workload, args, requests=args.concurrency))
    order = list(servers)
    for r in range(args.rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            res = asyncio.run(level(servers[key].grpc_url, servers[key], workload, args, requests=args.requests))
            runs[key].append(res)
            active = res["mean_active_per_decode_step"]
            print(f"  {name} round {r + 1} {key}: {res['requests_per_second']:.2f} req/s, llm executes "
                  f"{res['triton']['videochat_llm']['batch_size_histogram']}, mean active/step "
                  f"{'-' if active is None else f'{active:.1f}'}, errors {res['errors'] or 0}",
                  file=sys.stderr, flush=True)
    rps = {key: [x["requests_per_second"] for x in rows] for key, rows in runs.items()}
    ratios = [a / b for a, b in zip(rps["batching"], rps["no_batching"])]
    out = {
        "workload": {"file": str(workload["path"].relative_to(workload["path"].parents[3])),
                     "media": asdict(workload["media"]), "max_new_tokens": workload["max_new_tokens"], "greedy": True,
                     "concurrency": args.concurrency, "requests_per_level": args.requests, "turns": args.turns,
                     "distinct_media_per_session": not args.same_media, "prompts": list(PROMPTS[:args.turns])},
        "requests_per_second": {key: spread(v) for key, v in rps.items()},
        "ratio": spread(ratios),
        "ratio_of_medians": spread(rps["batching"])["median"] / spread(rps["no_batching"])["median"],
        "runs": runs,
    }
    if "static" in rps:
        out["inflight_over_static"] = spread([a / b for a, b in zip(rps["batching"], rps["static"])])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # --max-queue: room for every request of the closed loop, so the unbatched server queues them instead of
    # refusing the overflow (its default queue is 4 x --max-active): this measures throughput, not backpressure
    common = [*(["--checkpoint", str(args.checkpoint)] if args.checkpoint else []), "--device", "cpu",
              "--max-queue", str(args.concurrency), *args.serve_arg]
    configs = {"batching": [*common, "--max-batch-size", str(args.batch_size)],
               "no_batching": [*common, "--max-batch-size", "1"]}
    if args.with_static_baseline:
        configs["static"] = [*common, "--max-batch-size", str(args.batch_size), *STATIC_ARGS]
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = {}
    with tempfile.TemporaryDirectory(prefix="videochat-bench-") as tmp, contextlib.ExitStack() as stack:
        args.copies_dir = str(Path(tmp) / "media-copies")
        servers = {key: stack.enter_context(serve(cfg, Path(tmp) / key)) for key, cfg in configs.items()}
        for name in names:
            results[name] = run_workload(name, servers, args)
        commands = {k: s.command for k, s in servers.items()}
    payload = {"benchmark": "dynamic batching gain", "command": "python bench/batching_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "serve_commands": commands, "target_ratio": 4.0,
        "cpu_note": "2 shared CPU cores; both servers are up during the whole run, levels alternate",
        "workloads": results}
    path = write_json(args.out, payload)
    for name, res in results.items():
        r, on_, off_ = res["ratio"], res["requests_per_second"]["batching"], res["requests_per_second"]["no_batching"]
        hist = {}
        for run in res["runs"]["batching"]:
            for size, n in run["triton"]["videochat_llm"]["batch_size_histogram"].items():
                hist[size] = hist.get(size, 0) + n
        extra = (f"; in-flight / static (before) {res['inflight_over_static']['median']:.2f}x"
                 if "inflight_over_static" in res else "")
        print(f"{name} (turns {args.turns}): batching {on_['median']:.2f} req/s [{on_['min']:.2f}-{on_['max']:.2f}] vs "
              f"max-batch-size 1 {off_['median']:.2f} [{off_['min']:.2f}-{off_['max']:.2f}] -> "
              f"{r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f}, target >= 4x: "
              f"{'met' if r['median'] >= 4 else 'missed'}); llm executes by size {dict(sorted(hist.items()))}{extra}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
