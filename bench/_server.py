"""Shared by the bench scripts: run `python -m videochat serve ARGS` through the launcher's own Python API (same
argument parser, same demo checkpoint, same rendering, same TritonServer class) on free loopback ports, and read
Triton's per-model statistics (batch sizes, stage durations) from its HTTP statistics API.
"""
from __future__ import annotations

import json
import socket
import statistics
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from videochat.launch import launcher  # imports no torch
from videochat.launch.render import ENSEMBLE, LLM, PREPROCESSING, render_repository
from videochat.launch.tritonserver import Endpoints, TritonServer, find_triton

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VIDEOS = ROOT / "tests" / "data" / "videos"


MODELS = (ENSEMBLE, PREPROCESSING, LLM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_checkpoint() -> Path:
    """The checkpoint `python -m videochat serve` uses without --checkpoint (made on first use)."""
    return launcher.ensure_demo_checkpoint(launcher.DEFAULT_WORK_DIR.parent / "demo")


@dataclass
class Served:
    server: TritonServer
    endpoints: Endpoints
    command: str                     # the equivalent `python -m videochat serve ...` line
    log: Path

    @property
    def grpc_url(self) -> str:
        return self.endpoints.grpc_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self.endpoints.host}:{self.endpoints.metrics_port}/metrics"

    def stats(self, model: str) -> dict:
        """Triton's statistics extension for one model (cumulative since start)."""
        with urllib.request.urlopen(f"{self.endpoints.http_url}/v2/models/{model}/stats", timeout=10) as r:
            return json.load(r)["model_stats"][0]

    def snapshot(self) -> dict[str, dict]:
        return {m: self.stats(m) for m in MODELS}


@contextmanager
def serve(serve_args: Sequence[str], work_dir: Path, *, ready_timeout_s: float = 600) -> Iterator[Served]:
    """Start tritonserver as `python -m videochat serve <serve_args>` would (ports replaced by free ones); stop it
    (SIGTERM, then SIGKILL of its process group) on exit, whatever happens."""
    args = launcher.build_parser().parse_args(list(serve_args))
    checkpoint = args.checkpoint.resolve() if args.checkpoint else demo_checkpoint()
    opts = launcher.options_from_args(args, checkpoint)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    repo = render_repository(opts, work_dir / "model_repository")
    endpoints = Endpoints("127.0.0.1", free_port(), free_port(), free_port())
    log = work_dir / "tritonserver.log"
    log.unlink(missing_ok=True)
    # the launcher's default work dir holds the prepared server copy: shared with `python -m videochat serve`
    server = TritonServer(find_triton(launcher.DEFAULT_WORK_DIR), repo, endpoints, log_path=log, exit_timeout_s=10)
    command = " ".join(["python -m videochat serve", *serve_args])
    server.start()
    try:
        server.wait_ready(timeout_s=ready_timeout_s)
        yield Served(server, endpoints, command, log)
    finally:
        server.stop()


def stats_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model over an interval: executions, inferences, batch-size histogram and mean stage times (ms)."""
    out = {}
    for model in after:
        a, b = after[model], before[model]
        sizes: dict[int, int] = {}
        old = {s["batch_size"]: s["compute_infer"]["count"] for s in b.get("batch_stats", [])}
        for s in a.get("batch_stats", []):
            n = s["compute_infer"]["count"] - old.get(s["batch_size"], 0)
            if n:
                sizes[int(s["batch_size"])] = n
        execs = int(a["execution_count"]) - int(b["execution_count"])
        infers = int(a["inference_count"]) - int(b["inference_count"])
        entry = {"execution_count": execs, "inference_count": infers,
                 "avg_batch_size": infers / execs if execs else None,
                 "batch_size_histogram": dict(sorted(sizes.items()))}
        sa, sb = a["inference_stats"], b["inference_stats"]
        n = sa["success"]["count"] - sb["success"]["count"]
        for stage in ("queue", "compute_input", "compute_infer", "compute_output", "success"):
            ns = sa[stage]["ns"] - sb[stage]["ns"]
            # `success` ns is the whole request time inside this model (queue + compute)
            entry[f"avg_{'request' if stage == 'success' else stage}_ms"] = ns / n / 1e6 if n else None
        out[model] = entry
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
