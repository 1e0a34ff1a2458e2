"""Cross-check `videochat loadtest` against Triton's perf_analyzer on the same server, model and input, at several
concurrencies, with >= 200 measured requests per level and tool; results in bench/results/crosscheck.json.

    .venv/bin/python bench/crosscheck_bench.py                       # concurrency 1,4,16; 200 requests each
    .venv/bin/python bench/crosscheck_bench.py --concurrency 1,4 --requests 200 --max-new-tokens 2

What is compared (docs/loadtest.md, "Cross-check with perf_analyzer"):
* throughput: requests/s of both tools, directly;
* latency: perf_analyzer 2.51 measures a decoupled model's latency to its FIRST response, so its percentiles
  compare with our time to first token (TTFT); our full latency is reported next to it;
* the server's own view over each tool's run (videochat_time_to_first_token_seconds and
  videochat_e2e_request_latency_seconds means from the metrics port), which both tools share.
The levels alternate the tools (perf_analyzer, then ours) on one warm server; the input is the tiny fixture's
image with max_new_tokens small, so the sweep fits in minutes on 2 CPU cores.

perf_analyzer: $PERF_ANALYZER if set, else bin/perf_analyzer of the tritonclient==2.51.0 wheel (manylinux1; the
perf-analyzer wheels need glibc 2.38), fetched with pip into --work-dir; it needs libb64.so.0d and
libcudart.so.12, symlinked from nvidia-pytriton's bundled libraries.
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import json
import os
import platform
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ROOT, serve, write_json  # noqa: E402

from videochat_client.metrics import scrape  # noqa: E402

IMAGE = ROOT / "tests" / "data" / "tiny-videochat" / "videos" / "example1.mp4"   # sent as an image (one frame)
PROMPT = "Describe the action step by step."
TOLERANCE = {"requests_per_second": 0.15, "latency_p50": 0.15}   # relative; p90/p99 reported, not held


def perf_analyzer(work: Path) -> tuple[Path, dict[str, str]]:
    """The binary and the environment it runs in."""
    env = dict(os.environ)
    given = os.environ.get("PERF_ANALYZER")
    libs = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" \
        / "nvidia_pytriton.libs"
    libdir = work / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(glob.glob(str(libs / pattern)))
        if found and not (libdir / name).exists():
            (libdir / name).symlink_to(found[0])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libdir), str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    if given:
        return Path(given), env
    binary = work / "perf_analyzer"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                        str(work / "wheel"), "tritonclient==2.51.0"], check=True)
        wheel = glob.glob(str(work / "wheel" / "tritonclient-2.51.0-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.write_bytes(z.read(member))
        binary.chmod(0o755)
    return binary, env


def input_json(path: Path, max_new_tokens: int) -> None:
    raw = IMAGE.read_bytes()
    # perf_analyzer's "b64" is the serialized tensor: for BYTES each element is <uint32 length><bytes>
    data = {"data": [{"video": {"b64": base64.b64encode(struct.pack("<I", len(raw)) + raw).decode()},
                      "prompt": [PROMPT], "max_new_tokens": [max_new_tokens], "image": [True]}]}
    path.write_text(json.dumps(data))


def server_means(metrics_url: str, before) -> dict:
    """Mean server-side TTFT / e2e / queue (ms) since `before` (a scrape), from the histograms' sum and count."""
    after = scrape(metrics_url)
    out = {}
    for key, name in (("ttft_ms", "videochat_time_to_first_token_seconds"),
                      ("e2e_ms", "videochat_e2e_request_latency_seconds"),
                      ("queue_ms", "videochat_request_queue_time_seconds")):
        n = after.get(f"{name}_count", model="videochat_llm") - before.get(f"{name}_count", model="videochat_llm")
        total = after.get(f"{name}_sum", model="videochat_llm") - before.get(f"{name}_sum", model="videochat_llm")
        out[key] = total / n * 1e3 if n else None
        out["requests"] = n
    return out


def run_pa(binary: Path, env: dict, url: str, data: Path, concurrency: int, requests: int, work: Path) -> dict:
    out_csv = work / f"pa_c{concurrency}.csv"
    cmd = [str(binary), "-m", "videochat", "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
           "--concurrency-range", f"{concurrency}:{concurrency}", "--request-count", str(requests),
           "--percentile", "50", "-f", str(out_csv)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    row = next(csv.DictReader(out_csv.open()))
    return {"command": " ".join(cmd), "wall_s": wall, "requests_per_second": float(row["Inferences/Second"]),
            "latency_ms": {q: float(row[f"{q} latency"]) / 1e3 for q in ("p50", "p90", "p95", "p99")},
            "server_queue_us": float(row.get("Server Queue") or 0), "raw_csv_row": row,
            "stdout_tail": proc.stdout[-1500:]}


def run_ours(url: str, metrics_url: str, concurrency: int, requests: int, max_new_tokens: int, work: Path) -> dict:
    out = work / f"ours_c{concurrency}.json"
    cmd = [str(ROOT / ".venv" / "bin" / "videochat"), "loadtest", "--url", url, "--metrics-url", metrics_url,
           "--video", str(IMAGE), "--image", "--prompt", PROMPT, "--concurrency", str(concurrency),
           "--requests", str(requests), "--max-new-tokens", str(max_new_tokens), "--stream", "--quiet",
           "--warmup", str(concurrency), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    level = json.loads(out.read_text())["levels"][0]
    return {"command": " ".join(cmd), "wall_s": time.perf_counter() - t0,
            "requests": level["requests"], "errors": level["errors"],
            "requests_per_second": level["requests_per_second"],
            "latency_ms": {q: level["latency_ms"][q] for q in ("mean", "p50", "p90", "p95", "p99")},
            "time_to_first_token_ms": {q: level["time_to_first_token_ms"][q] for q in ("mean", "p50", "p90", "p95", "p99")}}


def client_cycle(work: Path, concurrency: int) -> dict:
    """From our per-request export: the mean time a request occupies its worker (start to end, which includes
    building the request and reading the stream to its end) against the latency it reports (send to final
    response). The difference is client time that the throughput pays for and the latency does not show."""
    rows = [json.loads(line) for line in (work / f"ours_c{concurrency}.requests.jsonl").open()]
    ok = [r for r in rows if r["status"] == "OK"]
    cycle = sum(r["end_s"] - r["start_s"] for r in ok) / len(ok) * 1e3
    latency = sum(r["latency_ms"] for r in ok) / len(ok)
    return {"mean_cycle_ms": cycle, "mean_latency_ms": latency, "outside_latency_ms": cycle - latency}


def within(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=200, help="measured requests per level and tool (>= 200)")
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/videochat_crosscheck"))
    p.add_argument("--out", default="crosscheck.json")
    p.add_argument("--annotate", action="store_true",
                   help="only add client_cycle (from --work-dir's exports) to an existing --out")
    args = p.parse_args(argv)
    if args.annotate:
        path = ROOT / "bench" / "results" / args.out
        payload = json.loads(path.read_text())
        for entry in payload["levels"]:
            entry["videochat_loadtest"]["client_cycle"] = client_cycle(args.work_dir, entry["concurrency"])
        print(write_json(args.out, payload))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    binary, env = perf_analyzer(work)
    data = work / "input.json"
    input_json(data, args.max_new_tokens)
    serve_args = ["--checkpoint", str(ROOT / "tests" / "data" / "tiny-videochat"), "--device", "cpu",
                  "--preprocess-instances", "1", "--max-active", "16"]
    results = []
    t_start = time.perf_counter()
    with serve(serve_args, work / "server") as served:
        url, murl = served.grpc_url, served.metrics_url
        run_ours(url, murl, 1, 8, args.max_new_tokens, work)                  # warm both caches and the stubs
        for c in levels:
            before = scrape(murl)
            pa = run_pa(binary, env, url, data, c, args.requests, work)
            pa["server"] = server_means(murl, before)
            before = scrape(murl)
            ours = run_ours(url, murl, c, args.requests, args.max_new_tokens, work)
            ours["server"] = server_means(murl, before)
            ours["client_cycle"] = client_cycle(work, c)
            rps_ratio = ours["requests_per_second"] / pa["requests_per_second"]
            p50_ratio = ours["time_to_first_token_ms"]["p50"] / pa["latency_ms"]["p50"]
            entry = {"concurrency": c, "perf_analyzer": pa, "videochat_loadtest": ours,
                     "ratio_rps_ours_over_pa": rps_ratio, "ratio_ttft_p50_ours_over_pa_latency_p50": p50_ratio,
                     "within_tolerance": {
                         "requests_per_second": within(ours["requests_per_second"], pa["requests_per_second"],
                                                       TOLERANCE["requests_per_second"]),
                         "latency_p50": within(ours["time_to_first_token_ms"]["p50"], pa["latency_ms"]["p50"],
                                               TOLERANCE["latency_p50"])}}
            results.append(entry)
            print(f"c={c}: rps pa {pa['requests_per_second']:.2f} ours {ours['requests_per_second']:.2f} "
                  f"(x{rps_ratio:.3f}); p50 pa {pa['latency_ms']['p50']:.1f} ms (first response) "
                  f"ours TTFT {ours['time_to_first_token_ms']['p50']:.1f} ms (x{p50_ratio:.3f}), "
                  f"latency {ours['latency_ms']['p50']:.1f} ms; server TTFT mean pa-run "
                  f"{pa['server']['ttft_ms'] or float('nan'):.1f} / ours-run {ours['server']['ttft_ms'] or float('nan'):.1f} ms",
                  flush=True)
        command = served.command
    payload = {"what": "videochat loadtest vs perf_analyzer 2.51.0 (--streaming, --request-count) on one server",
               "note": ("perf_analyzer 2.51 measures a decoupled model's latency to the FIRST response, so its "
                        "latency percentiles compare with our time_to_first_token_ms; throughputs directly. "
                        "'server' = the server's own histograms over each tool's run"),
               "tolerance_relative": TOLERANCE, "date_unix": time.time(), "host": platform.node(),
               "cpu_count": os.cpu_count(), "server_command": command, "input": {
                   "media": "tests/data/tiny-videochat/videos/example1.mp4 as an image", "prompt": PROMPT,
                   "max_new_tokens": args.max_new_tokens},
               "requests_per_level": args.requests, "wall_s": time.perf_counter() - t_start, "levels": results}
    path = write_json(args.out, payload)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
