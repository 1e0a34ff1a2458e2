"""Dynamic batching gain: the same `python -m videochat serve` configuration with batching on
(`--max-batch-size 16`) and off (`--max-batch-size 1`), the same closed-loop workload at concurrency 16 driven by
the client's load tool (`videochat_client.loadtest`), requests/s ratio. Both servers run side by side and the
load alternates between them round by round (A B, B A, ...), so the noise of the shared CPUs hits both alike.

    .venv/bin/python bench/batching_bench.py [--checkpoint DIR] [--workload video|image|all] [--rounds 3]

Workloads (each a real request a user would send; the defaults are the model card's where it has one):
* video: a 6 s 640x360 H.264 clip from the test corpus, 8 frames, padding off (3 clips x 8 frames), greedy,
  64 new tokens;
* image: a PNG with image=true (3 views x 1 frame), greedy, 200 new tokens (the card's max_new_tokens).
Writes bench/results/batching.json; prints one summary line per workload. Also reports the batch sizes the
`videochat_llm` step really executed (Triton's statistics API) and the mean time per stage.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from _server import VIDEOS, serve, stats_delta, spread, write_json

from videochat_client.loadtest import LoadConfig, run_loadtest
from videochat_client.protocol import MediaOptions

WORKLOADS = {
    "video": dict(path=VIDEOS / "faststart_h264_640x360_6s.mp4", media=MediaOptions(), max_new_tokens=64),
    "image": dict(path=VIDEOS / "image.png", media=MediaOptions(image=True), max_new_tokens=200),
}
PROMPTS = ("Describe the video in detail.",)


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
    p.add_argument("--out", default="batching.json")
    return p.parse_args(argv)


async def level(url: str, served, workload: dict, args, requests: int) -> dict:
    cfg = LoadConfig(url=url, videos=[str(workload["path"])], concurrency=[args.concurrency], requests=requests,
                     max_new_tokens=workload["max_new_tokens"], prompts=PROMPTS, media=workload["media"],
                     timeout=600.0)
    before = served.snapshot()
    report = await run_loadtest(cfg, progress_stream=None)
    time.sleep(0.5)   # decoupled requests are counted when released
    lv = report["levels"][0]
    return {"requests_per_second": lv["requests_per_second"], "successful_requests": lv["successful_requests"],
            "failed_requests": lv["failed_requests"], "errors": lv["errors"], "duration_s": lv["duration_s"],
            "output_tokens_per_second": lv["output_tokens_per_second"],
            "latency_ms_p50": (lv["latency_ms"] or {}).get("p50"),
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
            print(f"  {name} round {r + 1} {key}: {res['requests_per_second']:.2f} req/s, llm batches "
                  f"{res['triton']['videochat_llm']['batch_size_histogram']}, errors {res['errors'] or 0}",
                  file=sys.stderr, flush=True)
    on = [x["requests_per_second"] for x in runs["batching"]]
    off = [x["requests_per_second"] for x in runs["no_batching"]]
    ratios = [a / b for a, b in zip(on, off)]
    return {
        "workload": {"file": str(workload["path"].relative_to(workload["path"].parents[3])),
                     "media": asdict(workload["media"]), "max_new_tokens": workload["max_new_tokens"], "greedy": True,
                     "concurrency": args.concurrency, "requests_per_level": args.requests, "prompt": PROMPTS[0]},
        "requests_per_second": {"batching": spread(on), "no_batching": spread(off)},
        "ratio": spread(ratios),
        "ratio_of_medians": spread(on)["median"] / spread(off)["median"],
        "runs": runs,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    common = [*(["--checkpoint", str(args.checkpoint)] if args.checkpoint else []), "--device", "cpu",
              *args.serve_arg]
    configs = {"batching": [*common, "--max-batch-size", str(args.batch_size)],
               "no_batching": [*common, "--max-batch-size", "1"]}
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = {}
    with tempfile.TemporaryDirectory(prefix="videochat-bench-") as tmp, \
            serve(configs["batching"], Path(tmp) / "batching") as on, \
            serve(configs["no_batching"], Path(tmp) / "no_batching") as off:
        servers = {"batching": on, "no_batching": off}
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
        print(f"{name}: batching {on_['median']:.2f} req/s [{on_['min']:.2f}-{on_['max']:.2f}] vs "
              f"max-batch-size 1 {off_['median']:.2f} [{off_['min']:.2f}-{off_['max']:.2f}] -> "
              f"{r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f}, target >= 4x: "
              f"{'met' if r['median'] >= 4 else 'missed'}); llm batch sizes {dict(sorted(hist.items()))}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
