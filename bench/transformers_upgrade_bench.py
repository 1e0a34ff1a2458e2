"""No regression from the transformers 5 upgrade: the batching and overhead benchmarks, the same commands, run in
two checkouts of the project, interleaved (old, new, then new, old, ...) so the noise of the shared CPUs hits both
alike.

    git worktree add --detach ../tf457 22f8121   # main before the upgrade: transformers 4.57.6, HF Mistral
    git worktree add --detach ../tf524 0dd384b   # the upgrade merged: transformers 5.24.0, native llm.py
    (cd ../tf457 && bash scripts/setup.sh); (cd ../tf524 && bash scripts/setup.sh)
    .venv/bin/python bench/transformers_upgrade_bench.py --old ../tf457 --new ../tf524 [--repeats 1]

Each checkout runs its own bench scripts with its own .venv (so its own transformers and its own code); their
JSON results are collected into bench/results/transformers_upgrade.json with a summary per benchmark: the
batching gain and req/s, the server overhead and latency, old vs new.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _server import write_json

# name -> the benchmark's command line (the ones bench/results/*.json record), its output file under --out
# The checkouts' batching bench predates its --max-queue default (bench/batching_bench.py): without it the
# unbatched server refuses most of the closed loop's 16 requests (UNAVAILABLE), so it is passed here.
QUEUE = "--serve-arg=--max-queue=16"
BENCHES = {
    "batching": ["bench/batching_bench.py", "--workload", "all", "--with-static-baseline", QUEUE],
    "batching_multiturn": ["bench/batching_bench.py", "--workload", "all", "--turns", "2", "--with-static-baseline",
                           QUEUE],
    "server_overhead": ["bench/server_overhead_bench.py", "--runs", "9"],
    "server_overhead_image": ["bench/server_overhead_bench.py", "--runs", "9", "--image", "--video",
                              "tests/data/videos/image.png", "--max-new-tokens", "200"],
}


def versions(tree: Path) -> dict:
    code = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    torch_v, tf_v = subprocess.check_output([str(tree / ".venv/bin/python"), "-c", code], cwd=tree,
                                            text=True).split()[-2:]
    commit = subprocess.check_output(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], text=True).strip()
    return {"commit": commit, "torch": torch_v, "transformers": tf_v}


def run_bench(tree: Path, name: str, tag: str) -> tuple[dict, float]:
    out = f"upgrade_{name}_{tag}.json"
    cmd = [str(tree / ".venv/bin/python"), *BENCHES[name], "--out", out]
    print(f"[{tag}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=tree, check=True)
    path = tree / "bench" / "results" / out
    result = json.loads(path.read_text())
    path.unlink()
    return result, time.monotonic() - t0


def summary(name: str, result: dict) -> dict:
    """The figures a reader compares: batching gain and req/s per workload, or overhead and latency."""
    if name.startswith("batching"):
        return {w: {"gain_median": r["ratio"]["median"],
                    "rps_batching_median": r["requests_per_second"]["batching"]["median"],
                    "rps_no_batching_median": r["requests_per_second"]["no_batching"]["median"],
                    **({"rps_static_median": r["requests_per_second"]["static"]["median"]}
                       if "static" in r["requests_per_second"] else {})}
                for w, r in result["workloads"].items()}
    return {"overhead_ratio_of_medians": result["ratio_of_medians"],
            "server_ms_median": result["latency_ms"]["server"]["median"],
            "in_process_ms_median": result["latency_ms"]["in_process"]["median"],
            "same_tokens": result.get("same_tokens")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout before the upgrade (with its .venv)")
    ap.add_argument("--new", type=Path, required=True, help="checkout after the upgrade (with its .venv)")
    ap.add_argument("--bench", action="append", choices=sorted(BENCHES), help="default: all four")
    ap.add_argument("--repeats", type=int, default=1, help="old/new pairs per benchmark (order alternates)")
    ap.add_argument("--out", default="transformers_upgrade.json")
    args = ap.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    payload = {"benchmark": "transformers_upgrade", "command": " ".join(["python", *sys.argv]),
               "trees": {tag: versions(tree) for tag, tree in trees.items()}, "benches": {}}
    for name in args.bench or list(BENCHES):
        runs = []
        for i in range(args.repeats):
            for tag in (("old", "new") if i % 2 == 0 else ("new", "old")):
                result, wall = run_bench(trees[tag], name, tag)
                runs.append({"tree": tag, "wall_s": round(wall, 1), "summary": summary(name, result),
                             "result": result})
                print(f"[{tag}] {name}: {json.dumps(runs[-1]['summary'])}", flush=True)
        payload["benches"][name] = {"command": " ".join(["python", *BENCHES[name]]), "runs": runs}
        write_json(args.out, payload)   # after each benchmark: a long run keeps what it measured
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
