"""Failover figures behind haproxy: what the failover test does (tests/support/fleet.py, shared), with the
numbers saved so they can be quoted.

    python bench/failover_bench.py [--workers 6] [--max-new-tokens 8] [--turns-between 6] [--runs 1]

3 `videochat serve` replicas (demo checkpoint, CPU) behind deploy/haproxy/haproxy.cfg; `--workers` clients run
3-turn conversations through it (half stream); one replica is SIGKILLed (its whole process tree) with calls in
flight, `--turns-between` turns later another gets SIGTERM (drain), and the load runs on `--turns-between` turns
after it exited. Every answer is compared with what one healthy replica answered before the faults.
Writes bench/results/failover.json: conversations, requests, retried, lost, worst added latency, per run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _server import write_json  # noqa: E402

from support.fleet import run_failover  # noqa: E402
from support.haproxy import find_haproxy  # noqa: E402

TOTALS = ("conversations", "requests", "retried", "restarted_mid_stream", "lost", "mismatched")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--turns-between", type=int, default=6, help="turns before the kill, between the faults, after")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    binary = find_haproxy()
    if binary is None:
        print("haproxy not found: apt-get install haproxy (scripts/setup.sh does, as root)", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.runs):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="failover-bench-") as work:
            out = run_failover(Path(work), binary, workers=args.workers, max_new_tokens=args.max_new_tokens,
                               turns_between=args.turns_between, log=lambda m: print(f"run {i + 1}: {m}"))
        out["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"run {i + 1}: " + ", ".join(f"{k} {out[k]}" for k in (*TOTALS, "worst_added_latency_ms")))
        runs.append(out)
    summary = {k: sum(r[k] for r in runs) for k in TOTALS}
    summary["worst_added_latency_ms"] = max(r["worst_added_latency_ms"] for r in runs)
    payload = {"bench": "failover", "haproxy_config": "deploy/haproxy/haproxy.cfg", "replicas": 3,
               "workers": args.workers, "max_new_tokens": args.max_new_tokens, "turns_between": args.turns_between,
               **summary, "runs": runs}
    path = write_json("failover.json", payload)
    print(f"total: {summary}\nwrote {path}")
    return 0 if summary["lost"] == 0 and summary["mismatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
