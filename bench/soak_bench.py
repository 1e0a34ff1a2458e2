"""Soak test: does any process of a replica grow under a long mixed load?

Starts `python -m videochat serve --device cpu` (demo checkpoint, loopback, free ports, its own work dir), then
runs `--concurrency` closed-loop workers of the sync client library (`VideoChatClient`, one gRPC stream per
request) for `--minutes`, cycling through a fixed mix of sessions:

* good videos from tests/data/videos (2 turns: the second carries the first answer as history),
* one still image (`image=True`, 2 turns),
* every file whose manifest entry says "reject" (1 turn; expected INVALID_ARGUMENT),
* a good video with max_new_tokens over the server's limit (1 turn; expected INVALID_ARGUMENT).

Every `--sample-s` seconds it reads VmRSS (and RssAnon) from /proc of the launcher, tritonserver and each
python stub (named by its model instance, e.g. `videochat_llm_0_0`). After `--warmup-minutes` (caches,
allocator pools and the stubs' shared-memory regions fill then) each process's growth is
median(last 3 samples) - median(first 3 samples), and its slope is a least-squares fit in MB/min.

PASS when every process grew by at most `--max-growth-mb` after the warm-up, no request failed unexpectedly
(expected = INVALID_ARGUMENT for the bad inputs; a bad input that succeeds is unexpected too), and the server
stayed up. Writes bench/results/soak.json and a plot (bench/results/soak.png). Exit code 0 = pass, 1 = fail.
Traffic goes only to 127.0.0.1; the run stops by itself (time and `--max-requests`).

    .venv/bin/python bench/soak_bench.py [--minutes 30] [--warmup-minutes 5] [--concurrency 16]
        [--max-growth-mb 64] [--serve-arg=--stream-interval-ms=0 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _server import RESULTS, VIDEOS  # noqa: E402
from support.replica import Served, children, cmdline  # noqa: E402
from videochat_client import VideoChatClient, VideoChatError  # noqa: E402
from videochat_client.schema import LIMITS  # noqa: E402

# Small decodable files (a 2-core machine decodes them quickly; their media cache entries stay small).
GOOD_VIDEOS = ("example1.mp4", "faststart_h264_640x360_6s.mp4", "idx_solid_h264_320x240_300f.mp4",
               "vfr_h264_320x240_180f.mp4", "odd_size_vp9_333x197.webm")
IMAGE = "image.png"
EXPECTED_ERROR = "INVALID_ARGUMENT"
QUESTIONS = ("Describe the video.", "What happens next?")
MAX_MINUTES = 240.0
MB = 1024 * 1024


@dataclass(frozen=True)
class Session:
    kind: str              # "video", "image", "bad_file", "oversized"
    media: str             # file name under tests/data/videos
    turns: int
    image: bool = False
    max_new_tokens: Optional[int] = None   # None = the run's --max-new-tokens

    @property
    def expect_error(self) -> bool:
        return self.kind in ("bad_file", "oversized")


def reject_files() -> List[str]:
    manifest = json.loads((VIDEOS / "manifest.json").read_text())
    return sorted(f["file"] for f in manifest["files"] if str(f.get("expected", "")).startswith("reject"))


def session_mix() -> List[Session]:
    """One cycle of the workload: 5 good videos and 1 image (2 turns each), then every reject file and one
    oversized request (1 turn each)."""
    mix = [Session("video", v, 2) for v in GOOD_VIDEOS] + [Session("image", IMAGE, 2, image=True)]
    mix += [Session("bad_file", f, 1) for f in reject_files()]
    mix.append(Session("oversized", GOOD_VIDEOS[0], 1, max_new_tokens=LIMITS.max_new_tokens + 1))
    return mix


# -- processes and their memory ------------------------------------------------------------------------------
def _status(pid: int) -> Dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _rollup(pid: int) -> Dict[str, float]:
    """/proc/PID/smaps_rollup in kB. PSS splits a shared page among its mappings, so the PSS of all processes
    adds up to the memory really used, where RSS counts a shm page once per mapping."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = _kb(value.strip())
    return out


def _kb(text: str) -> float:
    return float(text.split()[0]) if text else 0.0


def process_name(pid: int) -> str:
    """`tritonserver`, a stub's model instance name (its 9th argument), or the executable's name."""
    argv = [a for a in cmdline(pid) if a]
    exe = os.path.basename(argv[0]) if argv else str(pid)
    if exe == "triton_python_backend_stub" and len(argv) > 8:
        return argv[8]
    return exe


def replica_processes(launcher_pid: int) -> Dict[str, int]:
    """name -> pid for the launcher, its tritonserver and the stubs under it."""
    procs = {"launcher": launcher_pid}
    for child in children(launcher_pid):
        try:
            if process_name(child) == "tritonserver":
                procs["tritonserver"] = child
                for stub in children(child):
                    procs[process_name(stub)] = stub
                    procs.update(decode_processes(process_name(stub), stub))
        except OSError:
            continue
    return procs


def decode_processes(stub_name: str, stub_pid: int) -> Dict[str, int]:
    """A preprocessing stub's decode isolation: its zygote and the workers forked from it (docs/operations.md,
    "Decode isolation"). A worker replaced after a fault keeps its name, so its series continues."""
    procs = {}
    for zygote in children(stub_pid):
        procs[f"{stub_name}.zygote"] = zygote
        for i, worker in enumerate(sorted(children(zygote))):
            procs[f"{stub_name}.worker{i}"] = worker
    return procs


def shm_region(pid: int) -> Optional[Path]:
    """A python stub's shared-memory region file (its 3rd argument), mapped by the stub and by tritonserver."""
    argv = [a for a in cmdline(pid) if a]
    if argv and os.path.basename(argv[0]) == "triton_python_backend_stub" and len(argv) > 2:
        return Path("/dev/shm") / argv[2]
    return None


def memory_mb(pid: int) -> Optional[Dict[str, float]]:
    """VmRSS and its parts: anonymous (heap), shared memory (the stubs' regions: counted in the stub AND in
    tritonserver, which maps every region), and for a stub its region's size and resident (touched) bytes."""
    try:
        st = _status(pid)
        rollup = _rollup(pid)
        region = shm_region(pid)
    except OSError:
        return None
    mb = {"rss": _kb(st.get("VmRSS", "")) / 1024, "anon": _kb(st.get("RssAnon", "")) / 1024,
          "shmem": _kb(st.get("RssShmem", "")) / 1024, "pss": rollup.get("Pss", 0.0) / 1024,
          "pss_shmem": rollup.get("Pss_Shmem", 0.0) / 1024}
    if region is not None:
        try:
            info = region.stat()
            mb.update(shm_region_size=info.st_size / MB, shm_region_resident=info.st_blocks * 512 / MB)
        except OSError:
            pass
    return {k: round(v, 2) for k, v in mb.items()}


# -- load ------------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    ok: int = 0
    by_kind: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)                 # every error, by gRPC status name
    unexpected: Counter = field(default_factory=Counter)            # "kind/code"
    unexpected_examples: List[str] = field(default_factory=list)

    def record(self, s: Session, error: Optional[VideoChatError]) -> None:
        with self.lock:
            self.requests += 1
            self.by_kind[s.kind] += 1
            code = None if error is None else error.code
            if code is None:
                self.ok += 1
            else:
                self.codes[code] += 1
            bad = (code != EXPECTED_ERROR) if s.expect_error else (code is not None)
            if bad:
                key = f"{s.kind}/{code or 'OK'}"
                self.unexpected[key] += 1
                if len(self.unexpected_examples) < 20:
                    self.unexpected_examples.append(f"{s.kind} {s.media}: {error or 'succeeded'}")


class Load:
    def __init__(self, url: str, mix: List[Session], *, concurrency: int, max_new_tokens: int,
                 stop_at: float, max_requests: int, timeout_s: float):
        self.client = VideoChatClient(url, timeout=timeout_s, max_retries=0)
        self.media = {s.media: (VIDEOS / s.media).read_bytes() for s in mix}
        self.mix, self.max_new_tokens = mix, max_new_tokens
        self.stop_at, self.max_requests = stop_at, max_requests
        self.tally = Tally()
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def _take(self) -> Optional[Session]:
        with self._lock:
            if time.monotonic() >= self.stop_at or self.tally.requests >= self.max_requests:
                return None
            s = self.mix[self._next % len(self.mix)]
            self._next += 1
            return s

    def _worker(self) -> None:
        while (s := self._take()) is not None:
            conv = self.client.conversation(self.media[s.media], image=s.image)
            for turn in range(s.turns):
                try:
                    conv.ask(QUESTIONS[turn % len(QUESTIONS)], max_new_tokens=s.max_new_tokens or self.max_new_tokens)
                    self.tally.record(s, None)
                except VideoChatError as e:
                    self.tally.record(s, e)
                    break

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.client.close()


# -- analysis --------------------------------------------------------------------------------------------------
def slope_per_min(ts: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    if len(ts) < 2:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return None if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 60.0


def growth(samples: List[dict], warmup_s: float) -> Dict[str, dict]:
    """Per process: RSS at start/end of the measured window (median of 3 samples), growth, slope, peak."""
    names = sorted({n for s in samples for n in s["mb"]})
    out = {}
    for name in names:
        pts = [(s["t"], s["mb"][name]["rss"]) for s in samples if name in s["mb"]]
        after = [(t, y) for t, y in pts if t >= warmup_s]
        if len(after) < 3:
            out[name] = {"samples_after_warmup": len(after)}
            continue
        ys = [y for _, y in after]
        start, end = statistics.median(ys[:3]), statistics.median(ys[-3:])
        out[name] = {"first_mb": pts[0][1], "start_mb": start, "end_mb": end, "growth_mb": round(end - start, 2),
                     "peak_mb": max(ys), "slope_mb_per_min": round(slope_per_min([t for t, _ in after], ys), 3),
                     "samples_after_warmup": len(after)}
    return out


def plot(samples: List[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 5))
    names = sorted({n for s in samples for n in s["mb"]})
    for name in names:
        pts = [(s["t"] / 60, s["mb"][name]["rss"]) for s in samples if name in s["mb"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.axvspan(0, warmup_s / 60, color="grey", alpha=0.15, label="warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    replica: Optional[Served] = None
    mix = session_mix()
    samples: List[dict] = []
    server_died_at = None
    t_start = time.monotonic()
    try:
        replica = Served(work_dir, "--host", "127.0.0.1", *args.serve_arg).wait_ready(timeout_s=600)
        procs = replica_processes(replica.proc.pid)
        print(f"serving on {replica.url}; processes {procs}", flush=True)
        t0 = time.monotonic()
        load = Load(replica.url, mix, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                    stop_at=t0 + args.minutes * 60, max_requests=args.max_requests, timeout_s=args.timeout)
        load.start()
        next_sample = t0
        while load.running():
            if time.monotonic() >= next_sample:
                procs = replica_processes(replica.proc.pid)   # decode workers can be replaced
                mb = {n: m for n, p in procs.items() if (m := memory_mb(p)) is not None}
                with load.tally.lock:
                    done, errors = load.tally.requests, sum(load.tally.codes.values())
                samples.append({"t": round(time.monotonic() - t0, 1), "requests": done, "errors": errors, "mb": mb})
                line = " ".join(f"{n}={m['rss']:.0f}" for n, m in sorted(mb.items()))
                print(f"[{samples[-1]['t'] / 60:5.1f} min] requests {done} errors {errors} RSS MB: {line}", flush=True)
                next_sample += args.sample_s
                if replica.proc.poll() is not None and server_died_at is None:
                    server_died_at = samples[-1]["t"]
                    print("the server exited during the run", flush=True)
            time.sleep(0.5)
        load.join(60)
        elapsed = time.monotonic() - t0
        tally = load.tally
    finally:
        rc = replica.stop() if replica is not None else None
        log_tail = replica.output(40)[-2000:] if replica is not None else ""
        shutil.rmtree(work_dir, ignore_errors=True)

    warmup_s = args.warmup_minutes * 60
    per_process = growth(samples, warmup_s)
    measured = [n for n in per_process if "growth_mb" in per_process[n]]
    over = {n: per_process[n]["growth_mb"] for n in measured if per_process[n]["growth_mb"] > args.max_growth_mb}
    unexpected = sum(tally.unexpected.values())
    after = [s for s in samples if s["t"] >= warmup_s]
    requests_after = (after[-1]["requests"] - after[0]["requests"]) if len(after) > 1 else 0
    reasons = []
    if over:
        reasons.append(f"grew more than {args.max_growth_mb} MB after the warm-up: {over}")
    if unexpected:
        reasons.append(f"{unexpected} unexpected errors: {dict(tally.unexpected)}")
    if server_died_at is not None:
        reasons.append(f"the server exited at {server_died_at} s")
    if not measured or tally.ok == 0:
        reasons.append("nothing measured (too short a run, or no request succeeded)")
    return {
        "what": "RSS of every replica process under a mixed 2-turn load; growth after the warm-up",
        "command": "python bench/soak_bench.py " + " ".join(sys.argv[1:]),
        "serve_command": " ".join(["python -m videochat serve"] + replica.cmd[4:]),
        "config": {"minutes": args.minutes, "warmup_minutes": args.warmup_minutes, "concurrency": args.concurrency,
                   "max_new_tokens": args.max_new_tokens, "max_growth_mb": args.max_growth_mb,
                   "sample_s": args.sample_s, "max_requests": args.max_requests, "serve_args": args.serve_arg,
                   "mix": [s.__dict__ for s in mix]},
        "elapsed_s": round(elapsed, 1),
        "requests": tally.requests, "succeeded": tally.ok, "requests_by_kind": dict(tally.by_kind),
        "requests_per_s": round(tally.requests / elapsed, 2) if elapsed else None,
        "requests_after_warmup": requests_after,
        "errors_by_code": dict(tally.codes), "unexpected_errors": dict(tally.unexpected),
        "unexpected_examples": tally.unexpected_examples,
        "per_process": per_process,
        "kb_per_request_after_warmup": {n: round(per_process[n]["growth_mb"] * 1024 / requests_after, 3)
                                        for n in measured if requests_after},
        "server_exit_code": rc, "server_log_tail": log_tail if reasons else "",
        "passed": not reasons, "fail_reasons": reasons,
        "wall_s": round(time.monotonic() - t_start, 1),
        "host": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "samples": samples,
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="load duration")
    ap.add_argument("--warmup-minutes", type=float, default=5.0,
                    help="not judged: caches, allocator pools and shm regions fill (the first ~2 min on this box)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="short answers: many requests per minute")
    ap.add_argument("--max-growth-mb", type=float, default=64.0,
                    help="most any process may grow after the warm-up (see docs/operations.md for why 64)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="hard stop on the request count")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra `serve` flag (repeat; use --serve-arg=--flag=value)")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "soak.png")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        ap.error(f"--minutes must be in (0, {MAX_MINUTES}]")
    if not 0 <= args.warmup_minutes < args.minutes:
        ap.error("--warmup-minutes must be in [0, --minutes)")
    if not 1 <= args.concurrency <= 256:
        ap.error("--concurrency must be in [1, 256]")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))   # run the finally blocks: stop the server
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    verdict = "PASS" if result["passed"] else "FAIL"
    plot(result["samples"], args.warmup_minutes * 60, args.plot,
         f"soak: {result['requests']} requests, {args.concurrency} clients, {args.minutes:g} min: {verdict}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "config", "server_log_tail")},
                     indent=1))
    print(f"{verdict}; wrote {args.out} and {args.plot}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
