"""What the health probe costs and whether a check reaches every instance.

    python bench/probe_bench.py [--checkpoint DIR] [--preprocess-instances 2] [--probes 50]

Starts tritonserver as `python -m videochat serve --device cpu --preprocess-instances N` would (no supervisor:
nothing reloads the model we break), then measures with `videochat_client.probe`:
* cost: the first check after start (one probe per instance) and `--probes` sequential warm probes (the same
  built-in image, so preprocessing's media cache and the visual-token cache answer: a 1-token prefill + decode),
  next to probes with a new image each time (decode + ViT + QFormer, what the probe would cost without caches);
* coverage: kill -9 one preprocessing stub, then 20 checks of 1 probe and 20 checks of N probes, idle and with a
  client thread sending requests: the share of checks that see the dead instance.
Writes bench/results/probe.json.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import VIDEOS, serve, spread, write_json  # noqa: E402

from videochat_client import VideoChatClient  # noqa: E402
from videochat_client.probe import PROBE_GEN, PROBE_MEDIA, PROBE_PROMPT, png_bytes, probe  # noqa: E402


def _p90(v: list[float]) -> float:
    return sorted(v)[int(0.9 * (len(v) - 1))]


def _summary(latencies: list[float]) -> dict:
    return {**{k: round(x, 2) if isinstance(x, float) else x for k, x in spread(latencies).items()},
            "p90": round(_p90(latencies), 2)}


def _uncached(client: VideoChatClient, n: int) -> list[float]:
    out = []
    for i in range(n):
        image = png_bytes(17 + i, 16)           # new bytes: a cache miss in preprocessing and the visual cache
        t0 = time.perf_counter()
        list(client.generate(video=image, prompt=PROBE_PROMPT, media=PROBE_MEDIA, gen=PROBE_GEN, max_retries=0))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stubs(server_pid: int, model: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == server_pid and len(argv) > 1 and Path(argv[1].decode()).parent.parent.name == model:
            pids.append(int(entry.name))
    return pids


def _coverage(client: VideoChatClient, count: int, checks: int) -> dict:
    seen = [not probe(client, count=count, timeout=10).ok for _ in range(checks)]
    return {"probes_per_check": count, "checks": checks, "saw_dead_instance": sum(seen),
            "share": round(sum(seen) / checks, 2)}


def _traffic(url: str, stop: threading.Event) -> None:
    with VideoChatClient(url, timeout=10, max_retries=0) as client:
        while not stop.is_set():
            try:
                client.conversation(VIDEOS / "example1.mp4", num_segments=2).ask("What happens?", max_new_tokens=4)
            except Exception:  # noqa: BLE001 - half of them fail on the dead instance; that is the point
                time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--preprocess-instances", type=int, default=2)
    p.add_argument("--probes", type=int, default=50)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/videochat-probe-bench"))
    args = p.parse_args(argv)
    n = args.preprocess_instances
    serve_args = ["--device", "cpu", "--preprocess-instances", str(n)]
    if args.checkpoint:
        serve_args += ["--checkpoint", str(args.checkpoint)]
    with serve(serve_args, args.work_dir) as served, VideoChatClient(served.grpc_url, timeout=60) as client:
        first = probe(client, count=n, timeout=60)
        warm = [probe(client, count=1, timeout=10).latency_ms[0] for _ in range(args.probes)]
        checks = [sum(probe(client, count=n, timeout=10).latency_ms) for _ in range(10)]
        uncached = _uncached(client, 20)

        victim = _stubs(served.server.proc.pid, "preprocessing")[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.0)
        idle = [_coverage(client, 1, 20), _coverage(client, n, 20)]
        stop = threading.Event()
        threading.Thread(target=_traffic, args=(served.grpc_url, stop), daemon=True).start()
        time.sleep(1.0)
        loaded = [_coverage(client, 1, 20), _coverage(client, n, 20)]
        stop.set()
        command = served.command

    result = {
        "command": f"python bench/probe_bench.py --preprocess-instances {n} --probes {args.probes}",
        "server": command,
        "probe": {"image": "16x16 PNG, image=true, num_segments=1, hd_num=1", "max_new_tokens": 1},
        "first_check_after_start_ms": [round(x, 1) for x in first.latency_ms],
        "warm_probe_ms": _summary(warm),
        f"warm_check_of_{n}_probes_ms": _summary(checks),
        "uncached_probe_ms": _summary(uncached),   # a new image each time: decode + ViT + QFormer too
        "coverage_one_preprocessing_instance_killed": {"idle": idle, "with_client_traffic": loaded},
        "failed_probe_ms": "about 1000 (Triton answers 'Stub process ... is not healthy' after ~1 s)",
    }
    path = write_json("probe.json", result)
    print(f"warm probe {statistics.median(warm):.1f} ms median (p90 {_p90(warm):.1f}); check of {n}: "
          f"{statistics.median(checks):.1f} ms; uncached {statistics.median(uncached):.1f} ms; first check "
          f"{[round(x) for x in first.latency_ms]} ms")
    for label, rows in (("idle", idle), ("traffic", loaded)):
        print(f"coverage ({label}): " + ", ".join(f"{r['probes_per_check']} probe(s)/check saw the dead instance in "
                                                  f"{r['saw_dead_instance']}/{r['checks']}" for r in rows))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
