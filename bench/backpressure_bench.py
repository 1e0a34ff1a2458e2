"""Backpressure under a flood: closed-loop clients (more than the server holds) against `python -m videochat serve
--max-active A --max-queue Q`, then against the same server with a queue too large to ever fill (the behaviour
before the bound). Per server: answers/s, the latency of the answered requests, how many were refused and how
fast a refusal came back, and the queue the scheduler held (its gauge, sampled).

    .venv/bin/python bench/backpressure_bench.py [--clients 16] [--duration 15] [--max-active 2] [--max-queue 4]
        [--max-new-tokens 64] [--refused-pause 1.0]

Each client loops: ask (no retries), and after a refusal wait `--refused-pause` before the next ask (what a
client's backoff does). Writes bench/results/backpressure.json and prints a summary.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _server import ROOT, serve, write_json

from videochat_client import Unavailable, VideoChatClient, VideoChatError

IMAGE = ROOT / "tests" / "data" / "tiny-videochat" / "videos" / "example1.mp4"
UNBOUNDED = 100_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "tests" / "data" / "tiny-videochat")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of flood per server")
    p.add_argument("--max-active", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--refused-pause", type=float, default=1.0)
    p.add_argument("--out", default="backpressure.json")
    return p.parse_args(argv)


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": statistics.median(v), "p95": pick(0.95), "max": v[-1], "n": len(v)}


def queued_gauge(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        m = re.search(r'^videochat_num_requests_waiting\{[^}]*model="videochat_llm"[^}]*\} (\S+)$', r.read().decode(), re.M)
    return float(m.group(1)) if m else 0.0


def flood(url: str, metrics_url: str, args) -> dict:
    data = IMAGE.read_bytes()
    ok, refused, other = [], [], []
    stop = time.monotonic() + args.duration
    lock = threading.Lock()

    def client_loop():
        with VideoChatClient(url, timeout=120, max_retries=0) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    c.conversation(data, image=True).ask("Tell a long story.", max_new_tokens=args.max_new_tokens)
                    with lock:
                        ok.append(time.perf_counter() - t0)
                except Unavailable:
                    with lock:
                        refused.append(time.perf_counter() - t0)
                    time.sleep(args.refused_pause)
                except VideoChatError as err:
                    with lock:
                        other.append(f"{err.code}: {err.message[:120]}")

    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    queue_samples = []
    while any(t.is_alive() for t in threads):
        queue_samples.append(queued_gauge(metrics_url))
        time.sleep(0.25)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    return {"answers": len(ok), "answers_per_s": len(ok) / elapsed, "answer_latency_s": percentiles(ok),
            "refused": len(refused), "refusal_latency_s": percentiles(refused), "other_errors": other[:10],
            "other_error_count": len(other), "queued_gauge": percentiles(queue_samples), "elapsed_s": elapsed}


def _shown(path: Path) -> str:
    """Relative to the repository when inside it (the JSON then names no checkout); run from its root."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common = ["--device", "cpu", "--max-active", str(args.max_active), "--max-batch-size", str(args.max_active),
              "--preprocess-instances", "1", "--checkpoint", _shown(args.checkpoint)]
    runs = {}
    for name, queue in (("bounded", args.max_queue), ("unbounded", UNBOUNDED)):
        serve_args = [*common, "--max-queue", str(queue)]
        with tempfile.TemporaryDirectory(prefix="videochat-bench-") as tmp, serve(serve_args, Path(tmp)) as served:
            with VideoChatClient(served.grpc_url) as c:      # warm-up, off the clock
                c.conversation(IMAGE, image=True).ask("Hi.", max_new_tokens=4)
            runs[name] = {"serve_command": served.command, **flood(served.grpc_url, served.metrics_url, args)}
        r = runs[name]
        lat, rej = r["answer_latency_s"] or {}, r["refusal_latency_s"] or {}
        print(f"{name:9s} (max_queue {queue}): {r['answers']} answers ({r['answers_per_s']:.2f}/s), answer latency "
              f"p50 {lat.get('p50', 0):.2f} s p95 {lat.get('p95', 0):.2f} s; {r['refused']} refused in p50 "
              f"{rej.get('p50', 0) * 1e3:.0f} ms p95 {rej.get('p95', 0) * 1e3:.0f} ms; queue p50 "
              f"{(r['queued_gauge'] or {}).get('p50', 0):.0f} max {(r['queued_gauge'] or {}).get('max', 0):.0f}",
              file=sys.stderr, flush=True)
    payload = {
        "benchmark": "backpressure: closed-loop flood, bounded vs unbounded queue",
        "command": "python bench/backpressure_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": args.clients, "duration_s": args.duration, "max_active": args.max_active,
        "max_queue": args.max_queue, "max_new_tokens": args.max_new_tokens, "refused_pause_s": args.refused_pause,
        "media": str(IMAGE.relative_to(ROOT)) + " (image=true)", "runs": runs,
    }
    print(write_json(args.out, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
