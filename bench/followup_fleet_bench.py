"""Follow-ups by media_key across a fleet: what session affinity buys.

    .venv/bin/python bench/followup_fleet_bench.py [--conversations 24] [--concurrency 3] [--turns 5]
                                                   [--max-new-tokens 8] [--runs 3]

2 `videochat serve` replicas (demo checkpoint, CPU) behind deploy/haproxy/haproxy.cfg; `--conversations`
5-turn conversations (4 small clips, `--concurrency` at a time, each its own session) whose follow-ups send the
first answer's `media_key`, run three times with the same file: hashing on (the default: `x-session-id`, bounded
load 150), hashing on without bounded load (VIDEOCHAT_LB_HASH_BALANCE_FACTOR=0), and hashing off
(VIDEOCHAT_LB_HASH_HEADER=x-no-affinity, a header no client sends: haproxy balances round robin). A key is only
valid on the replica that issued it, so a follow-up placed elsewhere misses and the client re-uploads once.
The modes take turns, `--runs` rounds. Per mode, over its rounds: the share of follow-ups answered by
reference (hit rate), re-uploads, video bytes uploaded per conversation, follow-up TTFT and latency medians,
the replicas' counters (hits, misses, re-uploads), calls per replica, and whether every answer equals the same
conversation on one replica alone. The shared code is tests/support/affinity.py (the e2e test
tests/e2e/test_media_reference_fleet.py runs it too).
Writes bench/results/followup_fleet.json and prints a table.
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

from support.affinity import run_affinity  # noqa: E402
from support.haproxy import find_haproxy  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="rounds of all modes in turn (figures: over all rounds)")
    args = ap.parse_args(argv)
    binary = find_haproxy()
    if binary is None:
        print("haproxy not found: apt-get install haproxy (scripts/setup.sh does, as root)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="followup-fleet-") as work:
        out = run_affinity(Path(work), binary, conversations=args.conversations, concurrency=args.concurrency,
                           turns=args.turns, max_new_tokens=args.max_new_tokens, runs=args.runs)
    payload = {"bench": "followup_fleet", "haproxy_config": "deploy/haproxy/haproxy.cfg", "checkpoint": "demo",
               **out, "wall_s": round(time.monotonic() - t0, 1)}
    path = write_json("followup_fleet.json", payload)
    print(f"{'mode':21} {'hit rate':>8} {'re-uploads':>10} {'MB/conv':>8} {'x upload':>8} {'TTFT ms':>8} "
          f"{'latency ms':>10}  server hits/misses/re-uploads  calls r1/r2")
    for mode, m in out["modes"].items():
        s = m["server"]
        print(f"{mode:21} {m['hit_rate']:8.3f} {m['reuploads']:10d} {m['bytes_per_conversation'] / 1e6:8.3f} "
              f"{m['upload_factor']:8.2f} {m['followup_ttft_ms']:8.1f} {m['followup_latency_ms']:10.1f}  "
              f"{s['media_reference_hits_total']}/{s['media_reference_misses_total']}/{s['media_reuploads_total']}"
              f"  {'/'.join(str(v) for v in m['calls_per_replica'].values())}")
    print(path)
    return 0 if all(m["mismatched"] == 0 for m in out["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
