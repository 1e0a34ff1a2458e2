"""Cost of decode isolation (preprocessing decodes in a worker process, videochat/serving/decode_worker.py).

    .venv/bin/python bench/decode_isolation_bench.py [--checkpoint DIR] [--rounds 2] [--c1-requests 8]
        [--c16-requests 32] [--max-new-tokens 8] [--pool-runs 11] [--workload video|image|all]
        [--skip-server | --skip-pool]

Two parts, each interleaved so the noise of the shared CPUs hits both sides alike:
* pool: one input decoded in this process (`decode_media`, what the stub does with --decode-isolation false)
  vs through a one-worker `DecodePool` (same function in the worker, plus the pipes); pixels checked
  identical. Inputs: the short video and the image of the server part, and the video with padding=true,
  whose 7 clips x 8 frames (16 MB fp16) show what the pixel transfer costs. Wall time (interleaved, median
  and min) and CPU time (this process + the worker, getrusage and /proc). Also: how long after a segfault
  its replacement worker is ready.
* server: two `python -m videochat serve` servers side by side, identical except --decode-isolation true/false
  (demo checkpoint, CPU, --media-cache-mb 0 --visual-cache-mb 0 so every request decodes), the client's load
  tool (`videochat_client.loadtest`): latency at concurrency 1 and throughput at concurrency 16, for a short
  video (6 s 640x360 H.264, 8 frames, 3 clips) and an image (PNG, image=true); rounds alternate A B / B A.
  Also Triton's mean preprocessing compute time per request, the CPU time per request of the preprocessing
  stubs with everything they started (zygotes, workers), and their memory (PSS).
Writes bench/results/decode_isolation.json and prints a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _server import VIDEOS, demo_checkpoint, serve, spread, stats_delta, write_json

from videochat.serving.decode_worker import FAULT_ENV, FAULT_MARKER, DecodeFailure, DecodePool
from videochat.serving.preprocess import decode_media, media_key
from videochat.serving.settings import DEFAULT_DECODE_MEMORY_MB, DEFAULT_DECODE_TIMEOUT_S
from videochat_client.loadtest import LoadConfig, run_loadtest
from videochat_client.protocol import MediaOptions

VIDEO = VIDEOS / "faststart_h264_640x360_6s.mp4"
IMAGE = VIDEOS / "image.png"
WORKLOADS = {"video": (VIDEO, MediaOptions()), "image": (IMAGE, MediaOptions(image=True))}
POOL_INPUTS = {**WORKLOADS, "video_padding_7clips": (VIDEO, MediaOptions(padding=True))}
MAX_BYTES = 512 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the serve command's demo checkpoint")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--c1-requests", type=int, default=8)
    p.add_argument("--c16-requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8, help="small: the LLM's share would hide the decode's")
    p.add_argument("--pool-runs", type=int, default=11)
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all", help="server part: which input")
    p.add_argument("--skip-server", action="store_true", help="only the pool part")
    p.add_argument("--skip-pool", action="store_true", help="only the server part")
    p.add_argument("--out", default="decode_isolation.json")
    return p.parse_args(argv)


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system, exited threads and reaped children included) of these processes."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])     # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def cpu_ms_per_call(call, runs: int, other_pids: list[int]) -> float:
    """Mean CPU time of `call`: this process (getrusage, all threads) + `other_pids` (/proc). CPU time barely
    moves with the load of the shared machine, unlike wall time."""
    import resource

    def now() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime + cpu_s(other_pids)

    t = now()
    for _ in range(runs):
        call()
    return (now() - t) / runs * 1e3


# -- pool part -----------------------------------------------------------------------------------------------
def pool_part(runs: int) -> dict:
    import numpy as np

    out = {}
    t0 = time.perf_counter()
    pool = DecodePool(timeout_s=DEFAULT_DECODE_TIMEOUT_S, memory_mb=DEFAULT_DECODE_MEMORY_MB)
    out["worker_ready_report"] = pool.wait_ready()[0]
    out["pool_start_s"] = time.perf_counter() - t0
    try:
        for name, (path, opts) in POOL_INPUTS.items():
            data = path.read_bytes()
            key = media_key(data, opts)
            pixels, _ = pool.decode(data, opts, key, MAX_BYTES)          # warm both sides
            ref, _ = decode_media(data, opts, key, MAX_BYTES)
            assert np.array_equal(pixels, ref), name
            times = {"in_process": [], "worker": []}
            for _ in range(runs):
                for side in ("in_process", "worker"):
                    fn = decode_media if side == "in_process" else pool.decode
                    t = time.perf_counter()
                    fn(data, opts, key, MAX_BYTES)
                    times[side].append((time.perf_counter() - t) * 1e3)
            worker_pid = pool.pids()[0]
            cpu = {"in_process": cpu_ms_per_call(lambda: decode_media(data, opts, key, MAX_BYTES), runs, []),
                   "worker": cpu_ms_per_call(lambda: pool.decode(data, opts, key, MAX_BYTES), runs, [worker_pid])}
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            out[name] = {"file": path.name, "bytes": len(data), "pixel_shape": list(pixels.shape),
                         "pixel_mb": pixels.nbytes / 2**20, "identical_pixels": True,
                         "wall_ms": {"in_process": spread(times["in_process"]), "worker": spread(times["worker"])},
                         "wall_overhead_ms": {"median": med["worker"] - med["in_process"],
                                              "min": low["worker"] - low["in_process"]},
                         "cpu_ms_per_decode": cpu, "cpu_overhead_ms": cpu["worker"] - cpu["in_process"],
                         "cpu_ratio": cpu["worker"] / cpu["in_process"]}
            print(f"pool {name} ({pixels.nbytes / 2**20:.1f} MB pixels): wall median {med['in_process']:.0f} vs "
                  f"{med['worker']:.0f} ms, min {low['in_process']:.0f} vs {low['worker']:.0f} ms; CPU "
                  f"{cpu['in_process']:.0f} vs {cpu['worker']:.0f} ms per decode (in-process vs worker)")
    finally:
        pool.close()
    # a separate pool with the fault switch armed (the timed one above never scans for the marker)
    pool = DecodePool(timeout_s=DEFAULT_DECODE_TIMEOUT_S, memory_mb=DEFAULT_DECODE_MEMORY_MB,
                      env={**os.environ, FAULT_ENV: "segfault"})
    try:
        pool.wait_ready()
        data, opts = VIDEO.read_bytes(), MediaOptions()
        recover = []
        for _ in range(3):
            try:
                pool.decode(data + FAULT_MARKER + b"segfault", opts, "k", MAX_BYTES)
            except DecodeFailure:
                pass
            t = time.perf_counter()
            pool.wait_ready()                    # the replacement: forked by the zygote, warmed up, capped
            recover.append((time.perf_counter() - t) * 1e3)
            pool.decode(data, opts, "k", MAX_BYTES)
        out["replacement_after_crash_ms"] = spread(recover)
        print(f"pool: start {out['pool_start_s']:.1f} s (zygote imports + first worker), a crashed worker's replacement is "
              f"ready {statistics.median(recover):.0f} ms after the failure (median of {len(recover)})")
    finally:
        pool.close()
    return out


# -- server part ---------------------------------------------------------------------------------------------
def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def preprocessing_family(work_dir: Path) -> tuple[list[int], list[int]]:
    """(stub pids, stubs + all their descendants: zygotes, workers) of this server's preprocessing model."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    model = str(work_dir / "model_repository" / "preprocessing")
    stubs = [p for p, c in cmdlines.items() if "triton_python_backend_stub" in c and model in c]
    family, todo = set(stubs), list(stubs)
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in family]
        family.update(kids)
        todo += kids
    return stubs, sorted(family)


def preprocessing_memory(work_dir: Path) -> dict:
    stubs, family = preprocessing_family(work_dir)
    return {"stubs": len(stubs), "processes": len(family), "stub_pss_mb": sum(map(pss_kb, stubs)) / 1024,
            "total_pss_mb": sum(map(pss_kb, family)) / 1024}


async def level(served, path: Path, media: MediaOptions, concurrency: int, requests: int,
                max_new_tokens: int) -> dict:
    cfg = LoadConfig(url=served.grpc_url, videos=[str(path)], concurrency=[concurrency], requests=requests,
                     max_new_tokens=max_new_tokens, prompts=("Describe the video in detail.",), media=media,
                     timeout=600.0)
    _, family = preprocessing_family(served.log.parent)
    before, cpu0 = served.snapshot(), cpu_s(family)
    report = await run_loadtest(cfg, progress_stream=None)
    time.sleep(0.5)   # decoupled requests are counted when released
    lv = report["levels"][0]
    pre = stats_delta(before, served.snapshot())["preprocessing"]
    cpu_ms = (cpu_s(family) - cpu0) * 1e3 / max(1, lv["successful_requests"])
    return {"requests_per_second": lv["requests_per_second"], "successful_requests": lv["successful_requests"],
            "failed_requests": lv["failed_requests"], "errors": lv["errors"],
            "latency_ms_p50": (lv["latency_ms"] or {}).get("p50"),
            "latency_ms_mean": (lv["latency_ms"] or {}).get("mean"),
            "preprocessing_compute_ms": pre["avg_compute_infer_ms"], "preprocessing_cpu_ms_per_request": cpu_ms}


def server_part(args, checkpoint: Path) -> dict:
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--media-cache-mb", "0", "--visual-cache-mb", "0"]
    modes = {"isolated": ["--decode-isolation", "true"], "in_stub": ["--decode-isolation", "false"]}
    result: dict = {"serve_commands": {}, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="videochat-bench-") as tmp, ExitStack() as stack:
        servers = {}
        for mode, extra in modes.items():
            served = stack.enter_context(serve([*common, *extra], Path(tmp) / mode))
            servers[mode] = served
            result["serve_commands"][mode] = served.command
        for name, (path, media) in WORKLOADS.items():
            if args.workload not in ("all", name):
                continue
            for served in servers.values():          # warm-up: first-call costs off the clock
                asyncio.run(level(served, path, media, 4, 8, args.max_new_tokens))
            runs = {mode: {"c1": [], "c16": []} for mode in servers}
            order = list(servers)
            for r in range(args.rounds):
                for mode in (order if r % 2 == 0 else order[::-1]):
                    c1 = asyncio.run(level(servers[mode], path, media, 1, args.c1_requests, args.max_new_tokens))
                    c16 = asyncio.run(level(servers[mode], path, media, 16, args.c16_requests,
                                            args.max_new_tokens))
                    runs[mode]["c1"].append(c1)
                    runs[mode]["c16"].append(c16)
                    print(f"  {name} round {r + 1} {mode}: c1 p50 {c1['latency_ms_p50']:.0f} ms "
                          f"(preprocessing {c1['preprocessing_compute_ms']:.0f} ms, "
                          f"{c1['preprocessing_cpu_ms_per_request']:.0f} ms CPU), c16 "
                          f"{c16['requests_per_second']:.2f} req/s, errors {c1['errors'] or 0}/{c16['errors'] or 0}",
                          flush=True)
            summary = {}
            for mode in servers:
                summary[mode] = {
                    "c1_latency_ms_p50": spread([x["latency_ms_p50"] for x in runs[mode]["c1"]]),
                    "c1_preprocessing_compute_ms": spread([x["preprocessing_compute_ms"] for x in runs[mode]["c1"]]),
                    "c16_requests_per_second": spread([x["requests_per_second"] for x in runs[mode]["c16"]]),
                    "c16_preprocessing_compute_ms": spread([x["preprocessing_compute_ms"]
                                                            for x in runs[mode]["c16"]]),
                    "preprocessing_cpu_ms_per_request": spread([x["preprocessing_cpu_ms_per_request"]
                                                                for k in ("c1", "c16") for x in runs[mode][k]]),
                    "failed_requests": sum(x["failed_requests"] for k in ("c1", "c16") for x in runs[mode][k]),
                }
            iso, base = summary["isolated"], summary["in_stub"]
            summary["c1_latency_ratio"] = iso["c1_latency_ms_p50"]["median"] / base["c1_latency_ms_p50"]["median"]
            summary["c1_latency_delta_ms"] = iso["c1_latency_ms_p50"]["median"] - base["c1_latency_ms_p50"]["median"]
            summary["c16_throughput_ratio"] = (iso["c16_requests_per_second"]["median"]
                                               / base["c16_requests_per_second"]["median"])
            summary["preprocessing_cpu_ratio"] = (iso["preprocessing_cpu_ms_per_request"]["median"]
                                                  / base["preprocessing_cpu_ms_per_request"]["median"])
            # per round: the two sides ran back to back, so their ratio cancels most of the machine's drift
            summary["per_round_ratios"] = [
                {"c1_latency": a["latency_ms_p50"] / b["latency_ms_p50"],
                 "c16_throughput": c["requests_per_second"] / d["requests_per_second"]}
                for a, b, c, d in zip(runs["isolated"]["c1"], runs["in_stub"]["c1"], runs["isolated"]["c16"],
                                      runs["in_stub"]["c16"])]
            summary["runs"] = runs
            result["workloads"][name] = {"file": path.name, "media": vars(media), **summary}
            print(f"{name}: c1 p50 {iso['c1_latency_ms_p50']['median']:.0f} vs "
                  f"{base['c1_latency_ms_p50']['median']:.0f} ms (x{summary['c1_latency_ratio']:.3f}), "
                  f"c16 {iso['c16_requests_per_second']['median']:.2f} vs "
                  f"{base['c16_requests_per_second']['median']:.2f} req/s (x{summary['c16_throughput_ratio']:.3f}), "
                  f"preprocessing CPU {iso['preprocessing_cpu_ms_per_request']['median']:.0f} vs "
                  f"{base['preprocessing_cpu_ms_per_request']['median']:.0f} ms/request")
        result["preprocessing_memory"] = {mode: preprocessing_memory(Path(tmp) / mode) for mode in servers}
        for mode, mem in result["preprocessing_memory"].items():
            print(f"memory {mode}: {mem['processes']} processes, PSS {mem['total_pss_mb']:.0f} MB "
                  f"(stubs {mem['stub_pss_mb']:.0f} MB)")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = (args.checkpoint or demo_checkpoint()).resolve()
    payload = {"benchmark": "decode isolation: worker process vs decoding in the preprocessing stub",
               "command": " ".join(["python bench/decode_isolation_bench.py", *(argv or sys.argv[1:])]),
               "checkpoint": str(checkpoint), "max_new_tokens": args.max_new_tokens,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(),
                           "note": "2 cores shared with other jobs: compare within a row, not across runs"}}
    if not args.skip_pool:
        payload["pool"] = pool_part(args.pool_runs)
    if not args.skip_server:
        payload["server"] = server_part(args, checkpoint)
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
